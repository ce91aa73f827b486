"""Tests of ipq_index.bench.config (ann-benchmarks style expansion and validation)
and of the key=value parsing in ipq_index.bench.params."""

from __future__ import annotations

from pathlib import Path

import pytest

from ipq_index.bench.config import (
    BenchConfig,
    ConfigError,
    MethodConfig,
    expand_args,
    load_config,
)
from ipq_index.bench.params import parse_params, parse_value

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


# --------------------------------------------------------------------------- expansion


def test_expand_list_of_lists_is_a_product():
    assert expand_args([[0, 2, 4]]) == [(0,), (2,), (4,)]
    assert expand_args([[1, 5], [0, 10]]) == [(1, 0), (1, 10), (5, 0), (5, 10)]
    # a scalar position counts as a one-value list
    assert expand_args([[1, 2], 7]) == [(1, 7), (2, 7)]
    assert expand_args(["nprobe=4"]) == [("nprobe=4",)]


def test_expand_dict_is_a_product_of_list_values_each_one_dict():
    out = expand_args({"rerank": [0, 2], "nprobe": [4, 8, 16], "ef": 64})
    assert len(out) == 6
    assert all(len(combo) == 1 and isinstance(combo[0], dict) for combo in out)
    assert out[0] == ({"rerank": 0, "nprobe": 4, "ef": 64},)
    assert out[-1] == ({"rerank": 2, "nprobe": 16, "ef": 64},)
    assert {(c[0]["rerank"], c[0]["nprobe"]) for c in out} == {(r, p) for r in (0, 2) for p in (4, 8, 16)}


def test_expand_empty_means_one_default_setting():
    assert expand_args(None) == [()]
    assert expand_args([]) == [()]


@pytest.mark.parametrize("value, key", [
    ("rerank", "query_args"),
    (5, "query_args"),
    ([[0, 1], []], "query_args[1]"),
    ({"rerank": []}, "query_args.rerank"),
])
def test_expand_errors_name_the_key(value, key):
    with pytest.raises(ConfigError, match=key.replace("[", r"\[").replace("]", r"\]")):
        expand_args(value, "query_args")


def test_method_query_args_forms():
    ipq, = MethodConfig.from_dict({"library": "ipq", "spec": "PCA,ASQ4,Rerank4",
                                   "query_args": {"rerank": [0, 2, 4]}})
    assert ipq.query_args == (({"rerank": 0},), ({"rerank": 2},), ({"rerank": 4},))
    assert ipq.name == "PCA,ASQ4,Rerank4"
    faiss_m, = MethodConfig.from_dict({"library": "faiss", "spec": "PQ{d}x4fs,RFlat",
                                       "query_args": [["k_factor_rf=1", "k_factor_rf=4"], ["nprobe=1"]]})
    assert faiss_m.query_args == (("k_factor_rf=1", "nprobe=1"), ("k_factor_rf=4", "nprobe=1"))
    assert faiss_m.resolved(384).spec == "PQ384x4fs,RFlat"
    assert faiss_m.resolved(384).name == "PQ384x4fs,RFlat"
    hn, = MethodConfig.from_dict({"library": "hnswlib", "args": {"M": 16},
                                  "query_args": [[10, 20]]})
    assert hn.args == {"M": 16, "ef_construction": 200}
    assert hn.query_args == ((10,), (20,))


def test_spec_and_args_lists_expand_into_builds():
    ms = MethodConfig.from_dict({"library": "ipq", "spec": ["PCA,ASQ4", "PCA,ASQ2"],
                                 "args": {"seed": [0, 1]}})
    assert [(m.spec, m.args["seed"]) for m in ms] == [("PCA,ASQ4", 0), ("PCA,ASQ4", 1),
                                                       ("PCA,ASQ2", 0), ("PCA,ASQ2", 1)]
    assert len({m.name for m in ms}) == 4
    hs = MethodConfig.from_dict({"library": "hnswlib", "args": {"M": [8, 16], "ef_construction": 100}})
    assert [m.args for m in hs] == [{"M": 8, "ef_construction": 100}, {"M": 16, "ef_construction": 100}]


# --------------------------------------------------------------------------- validation


def _cfg(**over):
    raw = {"dataset": "sample:minilm", "methods": [{"library": "ipq", "spec": "PCA,ASQ4"}]}
    raw.update(over)
    return raw


def test_minimal_config_defaults():
    cfg = BenchConfig.from_dict(_cfg())
    assert cfg.k == 10 and cfg.repeats == 2 and cfg.threads is None and cfg.warmup
    assert cfg.n_train is None and cfg.n_test is None
    assert len(cfg.methods) == 1 and cfg.methods[0].query_args == ((),)
    with pytest.raises(AttributeError):
        cfg.k = 5  # frozen


@pytest.mark.parametrize("raw, key", [
    (_cfg(frobnicate=1), "frobnicate"),
    ({"methods": [{"library": "ipq", "spec": "ASQ4"}]}, "dataset"),
    (_cfg(dataset=""), "dataset"),
    (_cfg(k=0), "k"),
    (_cfg(k="ten"), "k"),
    (_cfg(n_train=-5), "n_train"),
    (_cfg(threads=0), "threads"),
    (_cfg(warmup="yes"), "warmup"),
    (_cfg(methods=[]), "methods"),
    (_cfg(methods="PCA,ASQ4"), "methods"),
    (_cfg(methods=[{"library": "ipq", "spec": "ASQ4"}, {"library": "annoy", "spec": "x"}]),
     "methods[1].library"),
    (_cfg(methods=[{"library": "ipq"}]), "methods[0].spec"),
    (_cfg(methods=[{"library": "ipq", "spec": 4}]), "methods[0].spec"),
    (_cfg(methods=[{"library": "ipq", "spec": "ASQ4", "query_arg": [[1]]}]), "methods[0]"),
    (_cfg(methods=[{"library": "ipq", "spec": "ASQ4", "query_args": "rerank=2"}]),
     "methods[0].query_args"),
    (_cfg(methods=[{"library": "ipq", "spec": "ASQ4", "query_args": [[1], [2], [3], [4]]}]),
     "methods[0].query_args"),
    (_cfg(methods=[{"library": "faiss", "spec": "SQ4", "query_args": [[1, 4]]}]),
     "methods[0].query_args"),
    (_cfg(methods=[{"library": "hnswlib", "args": {"ef_construction": 100}}]), "methods[0].args.M"),
    (_cfg(methods=[{"library": "hnswlib", "args": {"M": 16, "efc": 1}}]), "methods[0].args"),
    (_cfg(methods=[{"library": "hnswlib", "args": {"M": 16}, "query_args": [[0]]}]),
     "methods[0].query_args"),
    (_cfg(methods=[{"library": "hnswlib", "args": {"M": 16}, "spec": "HNSW16"}]), "methods[0].spec"),
    (_cfg(methods=[{"library": "faiss", "spec": "SQ4", "args": [1]}]), "methods[0].args"),
    (_cfg(methods=[{"library": "faiss", "spec": "SQ4", "disabled": "no"}]), "methods[0].disabled"),
])
def test_validation_errors_name_the_bad_key(raw, key):
    with pytest.raises(ConfigError) as e:
        BenchConfig.from_dict(raw)
    assert key in str(e.value), str(e.value)
    assert isinstance(e.value, ValueError)


def test_load_config_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("dataset: sample:minilm\nmethods: [\n  - {library: ipq\n")
    with pytest.raises(ConfigError, match="bad.yaml: invalid YAML"):
        load_config(bad)
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing\n")
    with pytest.raises(ConfigError, match="empty"):
        load_config(empty)
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("dataset: sample:minilm\nk: 0\nmethods: [{library: ipq, spec: ASQ4}]\n")
    with pytest.raises(ConfigError, match=r"wrong\.yaml: k: must be >= 1"):
        load_config(wrong)


@pytest.mark.parametrize("name", sorted(p.stem for p in CONFIGS.glob("*.yaml")))
def test_shipped_configs_are_valid(name):
    cfg = load_config(CONFIGS / f"{name}.yaml")
    assert cfg.methods and all(m.library in ("ipq", "faiss", "hnswlib", "scann") for m in cfg.methods)
    text = (CONFIGS / f"{name}.yaml").read_text()
    assert "ipq bench --config configs/" in text  # documents how to run it


def test_tiny_config_shape():
    cfg = load_config(CONFIGS / "tiny.yaml")
    assert cfg.dataset == "sample:minilm" and cfg.n_train == 1500 and cfg.n_test == 50
    libs = [m.library for m in cfg.methods]
    assert libs.count("ipq") == 2
    assert [m.spec for m in cfg.methods if m.library == "faiss"] == ["Flat", "SQ4"]


def test_parse_params():
    assert parse_params(["rerank=2", "nprobe=16,ef=64", "mode=fast", "x=0.5", "y=none"]) == \
        {"rerank": 2, "nprobe": 16, "ef": 64, "mode": "fast", "x": 0.5, "y": None}
    assert parse_value("true") is True
    for bad in (["rerank"], ["=3"], ["2x=1"]):
        with pytest.raises(ValueError, match="key=value"):
            parse_params(bad)


def test_collect_query_args_forms_and_errors():
    import pytest

    from ipq_index.bench.params import collect_query_args

    assert collect_query_args(({"rerank": 2}, "fs=5", 7), ("ef",)) == {"rerank": 2, "fs": 5, "ef": 7}
    assert collect_query_args((None,), ("ef",)) == {}
    with pytest.raises(ValueError, match="positional"):
        collect_query_args((3, 4), ("ef",), "hnswlib query argument")
    with pytest.raises(ValueError, match="positional"):
        collect_query_args((16,), (), "faiss query argument")
