"""The factory: spec grammar (``parse_spec``), ``index_factory``, and
``warmup`` (compile the kernels an index of a spec uses)."""

from __future__ import annotations

import re

import numpy as np

from .encoder import EncoderConfig
from .settings import FlatSettings
from .structures import KINDS, FlatIndex

__all__ = ["index_factory", "parse_spec", "warmup"]

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
    per-vector scale, ``n`` no per-vector scale (neither: ``train`` decides
    on the data, ``EncoderConfig.scale``), ``m`` minimax (worst-case) objective.
    ``Rerank4`` keeps a float16 copy (``F32``: float32) and re-ranks 4 x k
    ADC candidates exactly by default.
    Spaces around components are ignored (``index_factory`` stores the spec
    without them: :func:`normalize_spec`).
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
                "'[PCA|ROT,][IVF<nlist>|HNSW<M>,]ASQ<bits>[u][s|n][m][,Rerank[<factor>][F16|F32]]')")
    if codec is None:
        raise ValueError(f"bad index spec {spec!r}: no ASQ<bits> codec")
    flags = codec.group("flags")
    if set(flags) - set("usnm") or len(set(flags)) != len(flags):
        raise ValueError(f"bad index spec {spec!r}: unknown codec flags {flags!r} (u, s or n, m)")
    if "s" in flags and "n" in flags:
        raise ValueError(f"bad index spec {spec!r}: flags s (scale) and n (no scale) exclude each other")
    out["bits"] = float(codec.group("bits"))
    if not 0 < out["bits"] <= 8:
        raise ValueError(f"bad index spec {spec!r}: ASQ bits per dimension must be in (0, 8], "
                         f"got {codec.group('bits')}")
    out["rounding"] = "unbiased" if "u" in flags else "nearest"
    out["scale"] = True if "s" in flags else False if "n" in flags else None
    out["objective"] = "max" if "m" in flags else "sum"
    return out


def normalize_spec(spec: str) -> str:
    """``spec`` without the spaces around its components (``" PCA , ASQ4"`` ->
    ``"PCA,ASQ4"``): the spelling an index stores and reports."""
    return ",".join(t.strip() for t in spec.split(","))


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
    spec = normalize_spec(spec)
    cls = KINDS[p["structure"]]
    names = cls.settings_class.names()
    unknown = set(options) - set(names) - set(EncoderConfig.__dataclass_fields__)
    if unknown:
        raise ValueError(f"unknown options {sorted(unknown)} for {spec!r}: settings of a {cls.__name__} are "
                         f"{', '.join(names)}; encoder options are {', '.join(EncoderConfig.__dataclass_fields__)}")
    settings = cls.settings_class().replace(**{k: v for k, v in options.items() if k in names})
    cfg = EncoderConfig.from_dict({"bits": p["bits"], "transform": p["transform"],
                                   "rounding": p["rounding"], "scale": p["scale"], "objective": p["objective"],
                                   **{k: v for k, v in options.items() if k not in names}})
    return cls(int(d), *cls._size_args(p), cfg, rerank=p["rerank"], rerank_dtype=p["rerank_dtype"], spec=spec,
               settings=settings)


def warmup(spec: str, d: int = 64) -> float:
    """Compile every kernel an index of ``spec`` uses to train, add, save and
    search (or load them from numba's on-disk cache), on a small synthetic
    index of dimension ``d``; returns the seconds it took.  Kernels compile
    once per machine (the cache lives next to the package, or in
    ``NUMBA_CACHE_DIR``); call this before timing a build or a search.
    The spec's IVF list count and graph degree are capped for the synthetic
    index: they do not change which kernels run.  A spec that leaves the
    per-vector scale to ``train`` warms both choices."""
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
    if p["scale"] is None:  # train decides the scale on the user's data: warm the other choice too
        other = index_factory(d, small, scale=not index.encoder.config.scale)
        other.train(X)
        other.add(X)
        other.warmup()
    return time.perf_counter() - t0
