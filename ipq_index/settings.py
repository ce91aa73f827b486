"""Per-index settings: every knob that changes what an index returns or how
fast, saved with the index, shown by ``ipq info``, set at
``index_factory(d, spec, **settings)`` or later with ``index.configure``.
Search calls take the per-call parameters (``k``, ``rerank``, ``fs``,
``nprobe``, ``ef``, ``nav``, ``num_threads``) that default to these.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

import numpy as np


def _int(v, name, lo):
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
        raise ValueError(f"setting {name} must be an int >= {lo}, got {v!r}")


def _share(v, name, allow_none=False):
    if v is None and allow_none:
        return
    if isinstance(v, bool) or not isinstance(v, (int, float, np.floating)) or not 0.0 < float(v) <= 1.0:
        raise ValueError(f"setting {name} must be a number in (0, 1], got {v!r}")


def _nonneg(v, name):
    if isinstance(v, bool) or not isinstance(v, (int, float, np.floating)) or not 0.0 <= float(v) < np.inf:
        raise ValueError(f"setting {name} must be a finite number >= 0, got {v!r}")


@dataclass(frozen=True)
class FlatSettings:
    """Settings of a flat index (and the shared part of the others)."""

    #: fast-scan candidate factor: the best ``fs * max(k, rerank * k)`` coarse
    #: scores are rescored with the full ADC; grows as sqrt(rows scanned /
    #: 100,000) above that many rows (per call: ``search(..., fs=)``, 0 =
    #: exhaustive full ADC)
    fs: int = 10
    #: the fast-scan candidate pool (``fs`` above) grows, per query, until it
    #: is depth_k times deeper than the coarse rank of the deepest of the k
    #: results (rank r: the pool holds at least depth_k * r rows); the scan
    #: and rescoring are repeated with a larger pool when it is not (0: a
    #: fixed pool; a per-call ``fs`` also fixes it).  depth_k = depth *
    #: ln 11 / ln(k + 1) (``depth_for_k``): this value at k = 10, more for
    #: fewer results, less for more (the deepest of k results bounds the
    #: others' rank displacement better as k grows; ``structures.flat.depth_for_k``)
    depth: float = 4.0
    #: below this many vectors every code is scored with the full ADC
    fastscan_min_rows: int = 4096
    #: share of the estimated score variance the fast-scan coarse codes keep
    #: (None: 0.97 flat, 0.95 IVF; 0.99 for per-vector-scaled codes; 0.98 for a
    #: graph's navigation codes); lower scans fewer bytes per row, ranks more coarsely
    coverage: float | None = None
    #: share of the score variance whose dimensions the candidate ADC reads
    #: when it picks the rows for the exact re-rank
    cand_coverage: float = 0.999
    #: the exact re-rank of every coarse candidate is chosen up to this many
    #: times the estimated cost of ADC rescoring + the exact re-rank of the best
    exact_preference: float = 1.3
    #: ``remove_ids`` compacts the index (``compact``) once removed rows
    #: exceed this share of the rows held (1.0: never automatically)
    compact_share: float = 0.5

    def __post_init__(self):
        _int(self.fs, "fs", 1)
        _nonneg(self.depth, "depth")
        _share(self.compact_share, "compact_share")
        _int(self.fastscan_min_rows, "fastscan_min_rows", 0)
        _share(self.coverage, "coverage", allow_none=True)
        _share(self.cand_coverage, "cand_coverage")
        _nonneg(self.exact_preference, "exact_preference")
        if self.coverage is not None:
            object.__setattr__(self, "coverage", float(self.coverage))

    @classmethod
    def names(cls) -> tuple:
        return tuple(f.name for f in fields(cls))

    def replace(self, **changes) -> "FlatSettings":
        """A validated copy with ``changes``; unknown names raise ValueError."""
        unknown = set(changes) - set(self.names())
        if unknown:
            raise ValueError(f"unknown settings {sorted(unknown)} for {type(self).__name__} "
                             f"(known: {', '.join(self.names())})")
        return replace(self, **changes)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "FlatSettings":
        return cls().replace(**d)


@dataclass(frozen=True)
class IVFSettings(FlatSettings):
    """Settings of an IVF index."""

    #: lists probed per query (per call: ``search(..., nprobe=)``)
    nprobe: int = 16
    #: share of the list-ordering variance the probe scores keep (1.0: every dimension)
    probe_coverage: float = 0.999
    #: probe score <q, c_l> + probe_spread * |q| * s_l (s_l: the RMS spread of
    #: list l around its centroid): an upper-confidence score; 0 = centroid only
    probe_spread: float = 2.0
    #: fast-scan coarse codes quantize each row's residual to its list's
    #: centroid (unscaled codes); False: the rows' values, as in the flat index
    residual: bool = True
    #: k-means training sample: 256 points per list up to this many (at least 64 per list)
    train_points: int = 262_144

    def __post_init__(self):
        super().__post_init__()
        _int(self.nprobe, "nprobe", 1)
        _share(self.probe_coverage, "probe_coverage")
        _nonneg(self.probe_spread, "probe_spread")
        if not isinstance(self.residual, (bool, np.bool_)):
            raise ValueError(f"setting residual must be True or False, got {self.residual!r}")
        _int(self.train_points, "train_points", 1)


@dataclass(frozen=True)
class GraphSettings(FlatSettings):
    """Settings of a graph (HNSW) index."""

    #: beam width of the walk (per call: ``search(..., ef=)``)
    ef: int = 64
    #: beam width while building the graph
    ef_construction: int = 200
    #: scores steering the walk: "coarse" (fast-scan codes, beam rescored by
    #: the full ADC) or "full" (full ADC); per call: ``search(..., nav=)``
    nav: str = "coarse"

    def __post_init__(self):
        super().__post_init__()
        _int(self.ef, "ef", 1)
        _int(self.ef_construction, "ef_construction", 1)
        if self.nav not in NAVS:
            raise ValueError(f"setting nav must be one of {NAVS}, got {self.nav!r}")


NAVS = ("coarse", "full")


class setting_property:
    """An index attribute that reads a setting (``index.settings.<name>``) and,
    when assigned, changes it through ``index.configure``."""

    def __init__(self, doc: str = ""):
        self.__doc__ = doc

    def __set_name__(self, owner, name):
        self.name = name

    def __get__(self, index, owner=None):
        return self if index is None else getattr(index.settings, self.name)

    def __set__(self, index, value):
        index.configure(**{self.name: value})
