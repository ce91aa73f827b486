"""Benchmark configs: YAML files with ann-benchmarks sweep semantics.

A config file describes one dataset and a list of methods to compare::

    dataset: sample:minilm          # an HDF5 path (ann-benchmarks layout) or sample:<name>
    n_train: 5000                   # optional: subsample the database (ground truth recomputed)
    n_test: 200                     # optional: subsample the queries
    k: 10                           # neighbours per query (default 10)
    threads: 2                      # threads for builds and batch search (default: all cores)
    repeats: 2                      # timing runs, best kept (default 2)
    seed: 0                         # seed of the subsampling (default 0)
    train_queries: 0                # hold N database rows out as ipq sample queries (default 0)
    warmup: true                    # compile each ipq spec's kernels before its timed build (compile_s)
    methods:
      - library: ipq                # ipq | faiss | hnswlib | scann (optional)
        spec: PCA,ASQ4,Rerank4      # factory string; a list of strings sweeps builds
        query_args: {rerank: [0, 2, 4]}
      - library: faiss
        spec: PQ{d}x4fs,RFlat       # {d} / {d/2} are replaced by the dimension / half of it
        query_args: [["k_factor_rf=1", "k_factor_rf=4"]]
      - library: hnswlib
        args: {M: 32, ef_construction: 200}
        query_args: [[10, 20, 40, 80]]   # ef

``query_args`` follows ann-benchmarks: a **list** is a product over its
positions (each position a scalar or a list of values) and every combination is
passed positionally, ``set_query_arguments(*combo)``; a **mapping**
``name -> value or list`` is a product over its list values and every
combination is passed as *one* dict argument.  Each combination is one search
setting on the *same* built index, i.e. one row of results.

What the values mean per library:

* ``ipq``: keyword arguments of ``index.search`` -- a mapping
  (``{rerank: [0, 2, 4]}``, later ``{nprobe: [...]}``, ``{ef: [...]}``),
  ``"name=value"`` strings, or bare positional values mapped to the names in
  :data:`ipq_index.bench.params.QUERY_ARG_NAMES` (``rerank``,
  ``nprobe``, ``ef``).  Names are checked against ``index.search`` when the
  index is built, not here (the set of index structures grows).
* ``faiss``: ``faiss.ParameterSpace`` settings, as ``"name=value"`` strings
  (``"k_factor_rf=4"``, ``"nprobe=16"``) or a mapping ``{k_factor_rf: [1, 4]}``.
* ``hnswlib``: ``ef`` as a bare value or ``{ef: [...]}``.
* ``scann``: a mapping ``{leaves_to_search: [...], reorder: [...]}``.  ScaNN is
  optional: ``ipq bench`` skips its methods with a note when ``import scann`` fails.

``args`` is a mapping of build settings: ``ipq`` -- encoder overrides passed to
``ipq_index.index_factory(d, spec, **args)`` (e.g. ``seed``, ``sample_size``);
``faiss`` -- ParameterSpace settings applied after the build, used as defaults
for every query setting; ``hnswlib`` -- ``M`` (required) and
``ef_construction`` (default 200); ``scann`` -- ``num_leaves``, ``avq_threshold``,
``dims_per_block``, ``reorder``, ``training_sample_size``.  List values in ``args`` and a list of
``spec`` strings expand into several builds (ann-benchmarks ``args`` semantics).

Every validation error is a :class:`ConfigError` (a ``ValueError``) whose
message names the offending key, e.g. ``methods[2].query_args``.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, field
from pathlib import Path

from .params import QUERY_ARG_NAMES

__all__ = [
    "ConfigError",
    "LIBRARIES",
    "MethodConfig",
    "BenchConfig",
    "expand_args",
    "load_config",
]

#: Libraries a method entry may name.
LIBRARIES = ("ipq", "faiss", "hnswlib", "scann")

_TOP_KEYS = ("dataset", "name", "n_train", "n_test", "k", "threads", "repeats", "seed",
             "train_queries", "warmup", "methods", "description")
_METHOD_KEYS = ("library", "name", "spec", "args", "query_args", "disabled")
_HNSW_ARGS = ("M", "ef_construction")
#: ScaNN build settings -> (type, minimum); see :class:`ipq_index.bench.baselines.ScannIndex`.
_SCANN_ARGS = {"num_leaves": (int, 1), "avq_threshold": (float, 0.0), "dims_per_block": (int, 1),
               "reorder": (int, 0), "training_sample_size": (int, 1)}
_SCANN_QUERY = ("leaves_to_search", "reorder")


class ConfigError(ValueError):
    """A benchmark config is malformed; the message names the bad key."""


# --------------------------------------------------------------------------- expansion


def expand_args(value, where: str = "query_args") -> list[tuple]:
    """Expand ann-benchmarks ``args`` / ``query_args`` into positional tuples.

    * ``None`` or ``[]`` -> ``[()]`` (one setting: the index defaults);
    * a list -> the Cartesian product over its positions, a scalar position
      counting as a one-value list: ``[[1, 2], 5]`` -> ``[(1, 5), (2, 5)]``;
    * a mapping -> the product over its list values, each combination one
      dict: ``{"a": [1, 2], "b": 0}`` -> ``[({"a": 1, "b": 0},), ({"a": 2, "b": 0},)]``.
    """
    if value is None:
        return [()]
    if isinstance(value, dict):
        for key, v in value.items():
            if not isinstance(key, str):
                raise ConfigError(f"{where}: keys must be strings, got {key!r}")
            if isinstance(v, list) and not v:
                raise ConfigError(f"{where}.{key}: empty list of values")
            if isinstance(v, dict):
                raise ConfigError(f"{where}.{key}: expected a value or a list of values, got a mapping")
        names = list(value)
        pools = [v if isinstance(v, list) else [v] for v in value.values()]
        return [(dict(zip(names, combo)),) for combo in itertools.product(*pools)]
    if isinstance(value, (list, tuple)):
        if not value:
            return [()]
        pools = []
        for i, v in enumerate(value):
            if isinstance(v, (list, tuple)):
                if not v:
                    raise ConfigError(f"{where}[{i}]: empty list of values")
                pools.append(list(v))
            else:
                pools.append([v])
        return [tuple(combo) for combo in itertools.product(*pools)]
    raise ConfigError(f"{where}: expected a list (of lists) or a mapping of name -> list, "
                      f"got {type(value).__name__} {value!r}")


def _is_scalar(v) -> bool:
    return v is None or isinstance(v, (bool, int, float, str))


def _check_query_combo(library: str, combo: tuple, where: str) -> None:
    """Library-specific shape checks of one expanded query-argument tuple."""
    for pos, arg in enumerate(combo):
        if isinstance(arg, dict):
            for key, v in arg.items():
                if not _is_scalar(v):
                    raise ConfigError(f"{where}.{key}: expected a scalar value, got {v!r}")
            if library == "scann":
                _check_scann_query(arg, where)
            if library == "hnswlib":
                if set(arg) - {"ef"}:
                    raise ConfigError(f"{where}: hnswlib takes only 'ef' as query argument, "
                                      f"got {sorted(arg)}")
                if "ef" in arg:
                    _int(arg["ef"], f"{where}.ef", 1)
            continue
        if not _is_scalar(arg):
            raise ConfigError(f"{where}: expected scalar values, got {arg!r} at position {pos}")
        if library == "scann":
            raise ConfigError(f"{where}: scann query arguments must be a mapping "
                              f"(e.g. {{leaves_to_search: [10, 20], reorder: 100}}), got {arg!r}")
        if library == "faiss" and not (isinstance(arg, str) and "=" in arg):
            raise ConfigError(f"{where}: faiss query arguments must be 'name=value' strings "
                              f"(e.g. 'nprobe=16') or a mapping, got {arg!r}")
        if library == "hnswlib":
            if pos > 0:
                raise ConfigError(f"{where}: hnswlib takes one query argument (ef), got {len(combo)}")
            if isinstance(arg, bool) or not isinstance(arg, int) or arg < 1:
                raise ConfigError(f"{where}: hnswlib ef must be a positive int, got {arg!r}")
    if library == "ipq":
        bare = [a for a in combo if not isinstance(a, dict) and not (isinstance(a, str) and "=" in a)]
        if len(bare) > len(QUERY_ARG_NAMES):
            raise ConfigError(f"{where}: {len(bare)} positional query arguments, but only "
                              f"{len(QUERY_ARG_NAMES)} names are known {QUERY_ARG_NAMES}; use a mapping")


def _check_scann_query(arg: dict, where: str) -> None:
    bad = sorted(set(arg) - set(_SCANN_QUERY))
    if bad:
        raise ConfigError(f"{where}: unknown scann query argument(s) {bad} (allowed: {list(_SCANN_QUERY)})")
    for key, v in arg.items():
        _int(v, f"{where}.{key}", 1)


def _check_scann_args(a: dict, where: str) -> None:
    bad = sorted(set(a) - set(_SCANN_ARGS))
    if bad:
        raise ConfigError(f"{where}: unknown scann setting(s) {bad} (allowed: {list(_SCANN_ARGS)})")
    for key, v in a.items():
        kind, low = _SCANN_ARGS[key]
        if kind is int:
            _int(v, f"{where}.{key}", low)
        elif isinstance(v, bool) or not isinstance(v, (int, float)) or v < low:
            raise ConfigError(f"{where}.{key}: expected a number >= {low}, got {v!r}")


# --------------------------------------------------------------------------- dataclasses


def _int(value, where: str, minimum: int | None = None, allow_none: bool = False):
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise ConfigError(f"{where}: must be >= {minimum}, got {value}")
    return value


def _substitute(spec: str, d: int | None) -> str:
    if d is None:
        return spec
    out = spec.replace("{d/2}", str(d // 2)).replace("{d}", str(d))
    if "{" in out or "}" in out:
        raise ConfigError(f"unknown placeholder in spec {spec!r} (only {{d}} and {{d/2}})")
    return out


@dataclass(frozen=True)
class MethodConfig:
    """One build of one library, with its expanded query-argument settings.

    ``query_args`` holds the expanded positional tuples (see :func:`expand_args`);
    ``spec`` may contain ``{d}`` / ``{d/2}`` until :meth:`resolved` is called.
    """

    library: str
    name: str
    spec: str | None = None
    args: dict = field(default_factory=dict)
    query_args: tuple = ((),)
    disabled: bool = False

    @classmethod
    def from_dict(cls, raw: dict, where: str = "method") -> list["MethodConfig"]:
        """Validate one ``methods:`` entry; list values in ``spec``/``args`` expand
        into several builds, so this returns a list."""
        if not isinstance(raw, dict):
            raise ConfigError(f"{where}: expected a mapping with 'library', 'spec'/'args', "
                              f"'query_args', got {raw!r}")
        unknown = sorted(set(raw) - set(_METHOD_KEYS))
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {unknown} (allowed: {list(_METHOD_KEYS)})")
        library = raw.get("library")
        if library not in LIBRARIES:
            raise ConfigError(f"{where}.library: expected one of {list(LIBRARIES)}, got {library!r}")
        disabled = raw.get("disabled", False)
        if not isinstance(disabled, bool):
            raise ConfigError(f"{where}.disabled: expected true or false, got {disabled!r}")
        name = raw.get("name")
        if name is not None and not isinstance(name, str):
            raise ConfigError(f"{where}.name: expected a string, got {name!r}")

        spec = raw.get("spec")
        if library in ("hnswlib", "scann"):
            if spec is not None:
                raise ConfigError(f"{where}.spec: {library} takes no spec; use args (e.g. "
                                  + ("{M: 32, ef_construction: 200})" if library == "hnswlib"
                                     else "{num_leaves: 200, reorder: 100})"))
            specs = [None]
        else:
            if spec is None:
                raise ConfigError(f"{where}.spec: missing (a {library} factory string)")
            specs = spec if isinstance(spec, list) else [spec]
            if not specs:
                raise ConfigError(f"{where}.spec: empty list")
            for s in specs:
                if not isinstance(s, str) or not s.strip():
                    raise ConfigError(f"{where}.spec: expected a non-empty factory string, got {s!r}")

        args = raw.get("args", {})
        if args is None:
            args = {}
        if not isinstance(args, dict):
            raise ConfigError(f"{where}.args: expected a mapping of name -> value, got {args!r}")
        for key in args:
            if not isinstance(key, str):
                raise ConfigError(f"{where}.args: keys must be strings, got {key!r}")
        if library == "hnswlib":
            bad = sorted(set(args) - set(_HNSW_ARGS))
            if bad:
                raise ConfigError(f"{where}.args: unknown hnswlib setting(s) {bad} (allowed: {list(_HNSW_ARGS)})")
            if "M" not in args:
                raise ConfigError(f"{where}.args.M: missing (hnswlib graph degree, e.g. 32)")
        arg_sets = [c[0] for c in expand_args(args, f"{where}.args")] if args else [{}]
        for a in arg_sets:
            if library == "hnswlib":
                _int(a["M"], f"{where}.args.M", 2)
                _int(a.get("ef_construction", 200), f"{where}.args.ef_construction", 1)
            if library == "scann":
                _check_scann_args(a, f"{where}.args")
            for key, v in a.items():
                if not _is_scalar(v):
                    raise ConfigError(f"{where}.args.{key}: expected a scalar value, got {v!r}")

        query_args = tuple(expand_args(raw.get("query_args"), f"{where}.query_args"))
        for combo in query_args:
            _check_query_combo(library, combo, f"{where}.query_args")

        out = []
        multi = len(specs) * len(arg_sets) > 1
        for s, a in itertools.product(specs, arg_sets):
            if library == "hnswlib":
                a = {"M": a["M"], "ef_construction": a.get("ef_construction", 200)}
                auto = f"HNSW{a['M']},efC{a['ef_construction']}"
            elif library == "scann":
                auto = "ScaNN" + "".join(f",{k}={v}" for k, v in a.items())
            else:
                auto = s + (" " + ",".join(f"{k}={v}" for k, v in a.items()) if a else "")
            label = auto if name is None else (f"{name} [{auto}]" if multi else name)
            out.append(cls(library=library, name=label, spec=s, args=dict(a),
                           query_args=query_args, disabled=disabled))
        return out

    def resolved(self, d: int) -> "MethodConfig":
        """A copy with ``{d}`` / ``{d/2}`` substituted in ``spec`` and ``name``."""
        if self.spec is None:
            return self
        spec = _substitute(self.spec, d)
        name = self.name.replace(self.spec, spec) if self.spec in self.name else self.name
        return MethodConfig(self.library, name, spec, dict(self.args), self.query_args, self.disabled)


@dataclass(frozen=True)
class BenchConfig:
    """A validated benchmark config (see the module docstring for the keys)."""

    dataset: str
    methods: tuple = ()
    name: str | None = None
    n_train: int | None = None
    n_test: int | None = None
    k: int = 10
    threads: int | None = None
    repeats: int = 2
    seed: int = 0
    train_queries: int = 0
    warmup: bool = True
    description: str = ""
    source: str | None = None  #: the file it was read from, if any

    @classmethod
    def from_dict(cls, raw: dict, source: str | None = None) -> "BenchConfig":
        if not isinstance(raw, dict):
            raise ConfigError(f"config: expected a mapping at the top level, got {type(raw).__name__}")
        unknown = sorted(set(raw) - set(_TOP_KEYS))
        if unknown:
            raise ConfigError(f"config: unknown key(s) {unknown} (allowed: {list(_TOP_KEYS)})")
        dataset = raw.get("dataset")
        if not isinstance(dataset, str) or not dataset.strip():
            raise ConfigError(f"dataset: expected an HDF5 path or 'sample:<name>', got {dataset!r}")
        name = raw.get("name")
        if name is not None and not isinstance(name, str):
            raise ConfigError(f"name: expected a string, got {name!r}")
        description = raw.get("description", "") or ""
        if not isinstance(description, str):
            raise ConfigError(f"description: expected a string, got {description!r}")
        warmup = raw.get("warmup", True)
        if not isinstance(warmup, bool):
            raise ConfigError(f"warmup: expected true or false, got {warmup!r}")
        threads = raw.get("threads")
        if threads is not None and threads != -1:
            _int(threads, "threads", 1)
        methods_raw = raw.get("methods")
        if not isinstance(methods_raw, list) or not methods_raw:
            raise ConfigError("methods: expected a non-empty list of method entries")
        methods = []
        for i, m in enumerate(methods_raw):
            methods.extend(MethodConfig.from_dict(m, f"methods[{i}]"))
        return cls(
            dataset=dataset.strip(),
            methods=tuple(methods),
            name=name,
            n_train=_int(raw.get("n_train"), "n_train", 1, allow_none=True),
            n_test=_int(raw.get("n_test"), "n_test", 1, allow_none=True),
            k=_int(raw.get("k", 10), "k", 1),
            threads=None if threads in (None, -1) else threads,
            repeats=_int(raw.get("repeats", 2), "repeats", 1),
            seed=_int(raw.get("seed", 0), "seed", 0),
            train_queries=_int(raw.get("train_queries", 0), "train_queries", 0),
            warmup=warmup,
            description=description,
            source=source,
        )

    @property
    def enabled_methods(self) -> tuple:
        return tuple(m for m in self.methods if not m.disabled)


def load_config(path) -> BenchConfig:
    """Read and validate a YAML config file."""
    import yaml

    p = Path(os.fspath(path))
    if not p.is_file():
        raise FileNotFoundError(f"no such config file: {str(p)!r}")
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        at = f" (line {where.line + 1}, column {where.column + 1})" if where is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{p}: invalid YAML{at}: {problem}") from None
    if raw is None:
        raise ConfigError(f"{p}: the config file is empty")
    try:
        return BenchConfig.from_dict(raw, source=str(p))
    except ConfigError as e:
        raise ConfigError(f"{p}: {e}") from None
