"""Small helpers shared by the ann-benchmarks adapter, the baseline wrappers,
the config validation and the ``ipq`` command: metric names, row
normalisation, and search keyword arguments (parsing, merging, checking).

Imports numpy and the standard library only.
"""

from __future__ import annotations

import inspect

import numpy as np

__all__ = [
    "QUERY_ARG_NAMES",
    "CALLER_SEARCH_PARAMS",
    "normalize_metric",
    "unit",
    "parse_value",
    "parse_params",
    "collect_query_args",
    "check_search_params",
]

#: Names given, in order, to bare positional ipq query arguments.
QUERY_ARG_NAMES = ("rerank", "nprobe", "ef")

_ANGULAR = ("angular", "cosine")
_DOT = ("dot", "ip", "inner_product", "innerproduct", "mips")


def normalize_metric(metric) -> str:
    """``"angular"`` or ``"dot"`` for a search metric name; ``ValueError`` for
    anything else (ipq_index is a maximum inner product index)."""
    m = str(metric).strip().lower()
    if m in _ANGULAR:
        return "angular"
    if m in _DOT:
        return "dot"
    raise ValueError(f"metric {metric!r} is not supported by ipq_index (maximum inner product "
                     f"search): use 'angular' (normalised) or 'dot'")


def unit(A: np.ndarray) -> np.ndarray:
    """Rows of ``A`` scaled to unit L2 norm (zero rows stay zero), float32, C-contiguous."""
    n = np.linalg.norm(A, axis=1, keepdims=True)
    n[n == 0] = 1.0
    return np.ascontiguousarray(A / n, dtype=np.float32)


def parse_value(text: str):
    """``"4"`` -> 4, ``"0.5"`` -> 0.5, ``"true"``/``"false"`` -> bool,
    ``"none"``/``"null"`` -> None, anything else stays a string."""
    t = text.strip()
    low = t.lower()
    if low in ("none", "null"):
        return None
    if low in ("true", "false"):
        return low == "true"
    for conv in (int, float):
        try:
            return conv(t)
        except ValueError:
            pass
    return t


def parse_params(items, where: str = "--param") -> dict:
    """Parse ``["rerank=2", "nprobe=16,ef=64"]`` into ``{"rerank": 2, "nprobe": 16, "ef": 64}``."""
    out = {}
    for item in items or ():
        for part in str(item).split(","):
            if not part.strip():
                continue
            key, sep, value = part.partition("=")
            key = key.strip()
            if not sep or not key or not key.isidentifier():
                raise ValueError(f"{where}: expected key=value (e.g. rerank=2), got {part.strip()!r}")
            out[key] = parse_value(value)
    return out


def collect_query_args(args, names=(), where: str = "query argument") -> dict:
    """Merge ann-benchmarks ``set_query_arguments(*args)`` into one dict.

    Each argument is a dict, a ``"name=value"`` string, or a bare value taken
    positionally by ``names``; ``None`` values are dropped.
    """
    params: dict = {}
    bare = []
    for a in args:
        if isinstance(a, dict):
            params.update(a)
        elif isinstance(a, str) and "=" in a:
            params.update(parse_params([a], where))
        else:
            bare.append(a)
    if len(bare) > len(names):
        raise ValueError(f"{where}: {len(bare)} positional value(s) {bare!r} but only "
                         f"{len(names)} name(s) {list(names)}; pass a dict or 'name=value' strings")
    params.update(zip(names, bare))
    return {k: v for k, v in params.items() if v is not None}


#: ``index.search`` keywords the callers here (``ipq search``, the benchmark
#: wrappers) set themselves: ``num_threads`` has its own option,
#: ``return_std`` would add a third output none of them reads, and
#: ``filter`` is an array (``ipq search --filter FILE``).
CALLER_SEARCH_PARAMS = ("num_threads", "return_std", "filter")


def check_search_params(index, params: dict, reserved=CALLER_SEARCH_PARAMS) -> None:
    """Raise ``ValueError`` if ``index.search`` does not accept the keyword
    arguments ``params`` (checked on the signature, nothing is searched), or
    if one of them is in ``reserved`` (set by the caller; not listed as
    accepted either)."""
    if not params:
        return
    taken = sorted(set(params) & set(reserved))
    if taken:
        raise ValueError(f"search parameter(s) {', '.join(taken)} cannot be given here: "
                         f"the caller sets them")
    try:
        sig = inspect.signature(index.search)
    except (TypeError, ValueError):  # builtins without a signature: let search decide
        return
    try:
        sig.bind(np.zeros((1, 1), np.float32), 1, **params)
    except TypeError as e:
        accepted = [p.name for p in sig.parameters.values()
                    if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in reserved]
        names = ", ".join(sorted(params))
        raise ValueError(f"search parameter(s) {names} not accepted by this index "
                         f"({getattr(index, 'spec', type(index).__name__)}); it accepts "
                         f"{accepted} ({e})") from None
