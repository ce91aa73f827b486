"""End-to-end tests of the ``ipq`` command line (in-process via ``ipq_index.cli.main``,
plus one run of the installed console script)."""

from __future__ import annotations

import csv
import functools
import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import h5py
import numpy as np
import pytest

import ipq_index
from ipq_index import cli
from ipq_index.bench.config import load_config
from ipq_index.bench.datasets import load_sample

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "configs" / "tiny.yaml"
SPEC = "ASQ4,Rerank2"


def run(argv, capsys):
    """main(argv) -> (exit code, stdout, stderr)."""
    try:
        code = cli.main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, *fragments):
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("ipq: error: "), err
    assert "Traceback" not in err
    for f in fragments:
        assert f in lines[0], lines[0]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """``ipq build sample:minilm --n-train 1500`` once for the module."""
    d = tmp_path_factory.mktemp("cli")
    path = d / "tiny.ipq"
    code = cli.main(["build", "sample:minilm", "--index", SPEC, "-o", str(path),
                     "--n-train", "1500", "--threads", "1", "--quiet"])
    assert code == 0 and path.is_file()
    return path


def test_build_and_info(built, capsys):
    code, out, err = run(["info", built], capsys)
    assert code == 0, err
    assert SPEC in out and "384" in out and "1500" in out and "format version  1" in out
    assert "search defaults" in out and '"rerank": 2' in out
    code, out, _ = run(["info", built, "--json"], capsys)
    info = json.loads(out)
    assert info["meta"]["spec"] == SPEC and info["meta"]["d"] == 384 and info["meta"]["ntotal"] == 1500
    assert info["format_version"] == 1 and info["file_bytes"] == built.stat().st_size
    index = ipq_index.load(built)
    assert info["data_bytes"] == index.nbytes


def test_search_npy_and_csv_match_the_library(built, tmp_path, capsys):
    Q = load_sample("minilm").test
    index = ipq_index.load(built, mmap=True)
    ref_s, ref_i = index.search(Q, 10, num_threads=1)
    ref_s0, ref_i0 = index.search(Q, 10, rerank=0, num_threads=1)

    out_npy = tmp_path / "res.npy"
    code, _, err = run(["search", built, "sample:minilm", "--k", 10, "-o", out_npy, "--threads", 1], capsys)
    assert code == 0, err
    ids = np.load(out_npy)
    scores = np.load(tmp_path / "res.scores.npy")
    assert ids.shape == (Q.shape[0], 10) and ids.dtype == np.int64
    assert scores.shape == ids.shape and scores.dtype == np.float32
    np.testing.assert_array_equal(ids, ref_i)
    np.testing.assert_allclose(scores, ref_s, rtol=1e-6)

    # --param goes through to index.search; queries from a .npy file
    qfile = tmp_path / "q.npy"
    np.save(qfile, Q[:20])
    out0 = tmp_path / "res0.npy"
    code, _, err = run(["search", built, qfile, "-o", out0, "--param", "rerank=0", "--threads", 1], capsys)
    assert code == 0, err
    np.testing.assert_array_equal(np.load(out0), ref_i0[:20])

    out_csv = tmp_path / "res.csv"
    code, _, err = run(["search", built, "sample:minilm", "--k", 5, "-o", out_csv, "--threads", 1,
                        "--quiet"], capsys)
    assert code == 0, err
    with open(out_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["query", "rank", "id", "score"]
    assert len(rows) == Q.shape[0] * 5
    got = np.array([int(r["id"]) for r in rows]).reshape(Q.shape[0], 5)
    np.testing.assert_array_equal(got, ref_i[:, :5])
    assert [int(r["rank"]) for r in rows[:5]] == [0, 1, 2, 3, 4]
    np.testing.assert_allclose(float(rows[0]["score"]), ref_s[0, 0], rtol=1e-5)


def test_bench_tiny_config(tmp_path, capsys):
    out_dir = tmp_path / "bench"
    code, out, err = run(["bench", "--config", TINY, "--out", out_dir], capsys)
    assert code == 0, err
    csv_path = out_dir / "tiny.csv"
    assert csv_path.is_file()
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    cfg = load_config(TINY)
    assert len(rows) == sum(len(m.query_args) for m in cfg.methods)  # one per method x query setting
    assert {r["library"] for r in rows} == {"ipq", "faiss"}
    assert sorted(r["params"] for r in rows if r["method"] == "ASQ2,Rerank4") == ["rerank=0", "rerank=4"]
    for r in rows:
        assert 0.0 <= float(r["recall_at_k"]) <= 1.0 and float(r["qps_single"]) > 0
        assert int(r["n_train"]) == 1500 and int(r["n_test"]) == 50
    flat = next(r for r in rows if r["method"] == "Flat")
    assert float(flat["recall_at_k"]) == 1.0
    assert "recall@10" in out and "ASQ2,Rerank4" in out
    # tiny.yaml has warmup: false, so nothing is compiled separately
    assert all(r["compile_s"] == "nan" for r in rows)
    for r in rows:  # ipq: the file holds a subset of what RAM holds; FAISS: one number
        file_b, ram_b = float(r["file_bytes_per_vector"]), float(r["ram_bytes_per_vector"])
        assert 0 < file_b <= ram_b and (r["library"] == "ipq" or file_b == ram_b)
    assert float(flat["file_bytes_per_vector"]) == 384 * 4  # FAISS Flat: the float32 vector, implicit ids
    assert "file B/vec" in out and "RAM B/vec" in out and "compile s" in out
    try:
        import matplotlib  # noqa: F401
    except ImportError:  # the [bench] extra is not installed: no plot, said so
        assert "matplotlib is not installed" in out
    else:
        png = out_dir / "tiny.png"
        assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------- error paths


def test_error_missing_files(tmp_path, capsys):
    code, _, err = run(["info", tmp_path / "nope.ipq"], capsys)
    assert_one_line_error(code, err, "nope.ipq")
    code, _, err = run(["build", tmp_path / "nope.npy", "--index", "ASQ4", "-o", tmp_path / "x.ipq"], capsys)
    assert_one_line_error(code, err, "no such file", "nope.npy")
    code, _, err = run(["bench", "--config", tmp_path / "nope.yaml"], capsys)
    assert_one_line_error(code, err, "nope.yaml")
    code, _, err = run(["build", "sample:nosuch", "--index", "ASQ4", "-o", tmp_path / "x.ipq"], capsys)
    assert_one_line_error(code, err, "nosuch")


def test_error_bad_spec(tmp_path, capsys):
    X = np.random.default_rng(0).standard_normal((50, 8)).astype(np.float32)
    np.save(tmp_path / "x.npy", X)
    code, _, err = run(["build", tmp_path / "x.npy", "--index", "PCA,FOO4", "-o", tmp_path / "x.ipq"], capsys)
    assert_one_line_error(code, err, "PCA,FOO4")
    assert not (tmp_path / "x.ipq").exists()
    bad_cfg = tmp_path / "bad.yaml"
    bad_cfg.write_text("dataset: sample:minilm\nmethods:\n  - {library: ipq, spec: 'NOPE7'}\n")
    code, _, err = run(["bench", "--config", bad_cfg, "--out", tmp_path / "o"], capsys)
    assert_one_line_error(code, err, "NOPE7")


def test_error_bad_params_and_dimension(built, tmp_path, capsys):
    np.save(tmp_path / "q10.npy", np.zeros((3, 10), np.float32))
    code, _, err = run(["search", built, tmp_path / "q10.npy", "-o", tmp_path / "o.npy"], capsys)
    assert_one_line_error(code, err, "dimension 10", "d=384")
    code, _, err = run(["search", built, "sample:minilm", "-o", tmp_path / "o.npy", "--param", "bogus=1"], capsys)
    assert_one_line_error(code, err, "bogus")
    code, _, err = run(["search", built, "sample:minilm", "-o", tmp_path / "o.txt"], capsys)
    assert_one_line_error(code, err, ".npy or .csv")
    code, _, err = run(["search", built, "sample:minilm", "--k", 100000, "-o", tmp_path / "o.npy"], capsys)
    assert_one_line_error(code, err, "100000")


@pytest.mark.parametrize("damage", ["garbage", "truncated", "header"])
def test_error_corrupt_index(built, tmp_path, capsys, damage):
    bad = tmp_path / f"{damage}.ipq"
    raw = built.read_bytes()
    if damage == "garbage":
        bad.write_bytes(b"this is not an index\n" * 10)
    elif damage == "truncated":
        bad.write_bytes(raw[: len(raw) // 3])
    else:
        buf = bytearray(raw)
        buf[40] ^= 0xFF
        bad.write_bytes(bytes(buf))
    for argv in (["info", bad], ["search", bad, "sample:minilm", "-o", tmp_path / "o.npy"]):
        code, _, err = run(argv, capsys)
        assert_one_line_error(code, err, f"{damage}.ipq")


def test_usage_errors_are_one_line(capsys):
    code, _, err = run(["build"], capsys)
    assert_one_line_error(code, err, "required")
    code, _, err = run(["frobnicate"], capsys)
    assert_one_line_error(code, err, "frobnicate")
    code, _, err = run(["info", "x.ipq", "--bogus-flag"], capsys)
    assert_one_line_error(code, err, "--bogus-flag")


def test_debug_shows_the_exception(tmp_path):
    with pytest.raises(FileNotFoundError):
        cli.main(["--debug", "info", str(tmp_path / "nope.ipq")])


def test_datasets_list(capsys):
    code, out, _ = run(["datasets", "list"], capsys)
    assert code == 0
    assert "sample:minilm" in out and "glove-100-angular" in out and "lastfm-64-dot" in out


def test_datasets_fetch_offline_and_local_server(tmp_path, capsys):
    # nothing listens on port 9 here: an unreachable server -> one line, non-zero, no file
    code, _, err = run(["datasets", "fetch", "glove-25-angular", "--dir", tmp_path / "data",
                        "--base-url", "http://127.0.0.1:9", "--timeout", 5], capsys)
    assert_one_line_error(code, err, "cannot reach", "glove-25-angular.hdf5")
    assert not list((tmp_path / "data").glob("*"))

    # a local HTTP server standing in for ann-benchmarks.com
    srv_dir = tmp_path / "srv"
    srv_dir.mkdir()
    with h5py.File(srv_dir / "tiny-4-angular.hdf5", "w") as f:
        f["train"] = np.ones((5, 4), np.float32)
        f["test"] = np.ones((2, 4), np.float32)
        f.attrs["distance"] = "angular"
    class QuietHandler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    handler = functools.partial(QuietHandler, directory=str(srv_dir))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        code, out, err = run(["--quiet", "datasets", "fetch", "tiny-4-angular", "--dir", tmp_path / "data",
                              "--base-url", base], capsys)
        assert code == 0, err
        got = tmp_path / "data" / "tiny-4-angular.hdf5"
        assert got.read_bytes() == (srv_dir / "tiny-4-angular.hdf5").read_bytes()
        assert [p.name for p in (tmp_path / "data").iterdir()] == ["tiny-4-angular.hdf5"]  # no temp left
        umask = os.umask(0o022)
        os.umask(umask)
        assert got.stat().st_mode & 0o777 == 0o666 & ~umask  # an ordinary file, not mkstemp's 0o600
        code, _, err = run(["datasets", "fetch", "missing-1-angular", "--dir", tmp_path / "data",
                            "--base-url", base], capsys)
        assert_one_line_error(code, err, "HTTP 404", "not among the names")
    finally:
        server.shutdown()
        server.server_close()


def test_warmup_command(capsys):
    code, out, err = run(["warmup", SPEC], capsys)
    assert code == 0, err
    spec, _, seconds = out.strip().partition(": ")
    assert spec == SPEC and seconds.endswith(" s") and float(seconds[:-2]) >= 0


def test_warmup_command_several_specs_and_errors(monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(ipq_index, "warmup", lambda spec: calls.append(spec) or 0.5 * len(calls))
    code, out, err = run(["warmup", "PCA,ASQ4", "ASQ2,Rerank4"], capsys)
    assert code == 0, err
    assert calls == ["PCA,ASQ4", "ASQ2,Rerank4"]
    assert out.splitlines() == ["PCA,ASQ4: 0.50 s", "ASQ2,Rerank4: 1.00 s", "total: 1.50 s"]
    code, _, err = run(["warmup"], capsys)
    assert_one_line_error(code, err, "SPEC")
    code, _, err = run(["warmup", "PCA,ASQ4", "PCA,FOO4"], capsys)
    assert_one_line_error(code, err, "PCA,FOO4")
    assert len(calls) == 2  # every spec is checked before anything is compiled


def test_warmup_command_bad_spec(capsys):
    code, _, err = run(["warmup", "PCA,FOO4"], capsys)
    assert_one_line_error(code, err, "PCA,FOO4")


def test_demo_runs_with_the_cli_thread_environment(monkeypatch, capsys):
    import ipq_index.bench.demo as demo

    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.setattr(demo, "IPQ_SPECS", ("ASQ4",))
    monkeypatch.setattr(demo, "FAISS_SPECS", ("Flat",))
    code, out, err = run(["demo", "--sample", "glove50", "--k", "10"], capsys)
    assert code == 0, err
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    lines = out.splitlines()
    notice = next(i for i, line in enumerate(lines) if "compile on first use" in line)
    header = next(i for i, line in enumerate(lines) if line.startswith("library"))
    assert notice < header
    for column in ("compile s", "build s", "file bytes/vec", "RAM bytes/vec"):
        assert column in lines[header]
    ipq_row = lines[header + 1].split()
    faiss_row = lines[header + 2].split()
    assert ipq_row[:2] == ["ipq_index", "ASQ4"] and float(ipq_row[5]) >= 0
    assert float(ipq_row[-2]) < float(ipq_row[-1])  # RAM adds the fast-scan structures
    assert faiss_row[:2] == ["faiss", "Flat"] and faiss_row[5] == "-"
    assert float(faiss_row[-2]) == float(faiss_row[-1]) == 50 * 4
    assert float(faiss_row[2]) >= 0.99  # exact search (ties aside) finds the exact top-k
    assert "file bytes/vec:" in out and "RAM bytes/vec:" in out and "compile s:" in out


def test_demo_passes_arguments_through(monkeypatch, capsys):
    import ipq_index.bench.demo

    seen = []
    monkeypatch.setattr(ipq_index.bench.demo, "main", lambda argv=None: seen.append(argv))
    code, _, _ = run(["demo", "--sample", "glove50", "--k", "5"], capsys)
    assert code == 0 and seen == [["--sample", "glove50", "--k", "5"]]


def test_console_script_entry_point(built):
    exe = shutil.which("ipq", path=str(Path(sys.executable).parent)) or shutil.which("ipq")
    assert exe is not None, "the ipq console script is not installed (pip install -e .)"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    ok = subprocess.run([exe, "info", str(built)], capture_output=True, text=True, timeout=120, env=env)
    assert ok.returncode == 0, ok.stderr
    assert SPEC in ok.stdout
    bad = subprocess.run([exe, "info", str(built) + ".missing"], capture_output=True, text=True,
                         timeout=120, env=env)
    assert bad.returncode == 2
    assert bad.stderr.strip().startswith("ipq: error: ") and len(bad.stderr.strip().splitlines()) == 1


# --------------------------------------------------------------------------- input and option checks


@pytest.mark.parametrize("content, fragment", [(b"", "is empty (0 bytes)"),
                                               (b"abc", "not a .npy file"),
                                               (b"\x93NUMPY", "not a readable .npy array")])
def test_bad_npy_data_and_queries(built, tmp_path, capsys, content, fragment):
    bad = tmp_path / "bad.npy"
    bad.write_bytes(content)
    code, _, err = run(["build", bad, "--index", "ASQ4", "-o", tmp_path / "x.ipq"], capsys)
    assert_one_line_error(code, err, "bad.npy", fragment)
    assert not (tmp_path / "x.ipq").exists()
    code, _, err = run(["search", built, bad, "-o", tmp_path / "o.npy"], capsys)
    assert_one_line_error(code, err, "bad.npy", fragment)
    assert not (tmp_path / "o.npy").exists()


def test_npz_named_npy_is_refused(tmp_path, capsys):
    bad = tmp_path / "arrays.npy"
    with open(bad, "wb") as f:
        np.savez(f, a=np.ones((3, 4), np.float32))
    code, _, err = run(["build", bad, "--index", "ASQ4", "-o", tmp_path / "x.ipq"], capsys)
    assert_one_line_error(code, err, "arrays.npy", "not a .npy file")


def test_param_error_lists_only_accepted_names(built, tmp_path, capsys):
    code, _, err = run(["search", built, "sample:minilm", "-o", tmp_path / "o.npy", "--param", "bogus=1"],
                       capsys)
    assert_one_line_error(code, err, "bogus", "'rerank'", "'fs'")
    assert "num_threads" not in err and "return_std" not in err
    for name in ("num_threads", "return_std"):
        code, _, err = run(["search", built, "sample:minilm", "-o", tmp_path / "o.npy",
                            "--param", f"{name}=1"], capsys)
        assert_one_line_error(code, err, f"--param {name}")
    # every name the error lists is accepted
    code, _, err = run(["search", built, "sample:minilm", "--k", 3, "-o", tmp_path / "o.npy",
                        "--param", "rerank=1,fs=2", "--threads", 1, "--quiet"], capsys)
    assert code == 0, err


def test_check_search_params_reserved_names(built):
    from ipq_index.bench.params import check_search_params

    index = ipq_index.load(built)
    with pytest.raises(ValueError) as e:
        check_search_params(index, {"nope": 1})
    assert "['rerank', 'fs']" in str(e.value)
    with pytest.raises(ValueError, match="return_std"):
        check_search_params(index, {"return_std": True})
    check_search_params(index, {"rerank": 1, "fs": 2})


@pytest.mark.parametrize("threads", ["0", "-2", "two"])
def test_bad_thread_counts(built, tmp_path, capsys, threads):
    code, _, err = run(["build", "sample:minilm", "--index", "ASQ4", "-o", tmp_path / "x.ipq",
                        "--threads", threads], capsys)
    assert_one_line_error(code, err, "--threads", repr(threads) if threads == "two" else threads)
    assert not (tmp_path / "x.ipq").exists()
    code, _, err = run(["search", built, "sample:minilm", "-o", tmp_path / "o.npy", "--threads", threads],
                       capsys)
    assert_one_line_error(code, err, "--threads")
    assert not (tmp_path / "o.npy").exists()


def test_thread_count_minus_one_means_all_cores(built, tmp_path, capsys):
    code, _, err = run(["search", built, "sample:minilm", "--k", 3, "-o", tmp_path / "o.npy",
                        "--threads", -1, "--quiet"], capsys)
    assert code == 0, err


def test_build_stores_the_normalised_spec(tmp_path, capsys):
    out = tmp_path / "x.ipq"
    code, stdout, err = run(["build", "sample:minilm", "--index", "PCA , ASQ4", "-o", out,
                             "--n-train", 500, "--threads", 1, "--quiet"], capsys)
    assert code == 0, err
    assert "PCA,ASQ4," in stdout
    code, stdout, _ = run(["info", out, "--json"], capsys)
    assert json.loads(stdout)["meta"]["spec"] == "PCA,ASQ4"


@pytest.mark.parametrize("spec", ["PCA,ASQ44", "ASQ0", "ASQ9"])
def test_bits_out_of_range_errors_name_the_spec(tmp_path, capsys, spec):
    code, _, err = run(["build", "sample:minilm", "--index", spec, "-o", tmp_path / "x.ipq"], capsys)
    assert_one_line_error(code, err, repr(spec), "(0, 8]")
    code, _, err = run(["warmup", spec], capsys)
    assert_one_line_error(code, err, repr(spec), "(0, 8]")


@pytest.mark.parametrize("argv", [["info", "{built}", "--json"], ["info", "{built}"], ["datasets", "list"]])
def test_closed_stdout_ends_quietly(built, argv):
    """``ipq ... | head -1``: the reader is gone before ipq writes; ipq exits 0 with nothing on stderr."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # every write to write_end now fails with EPIPE
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    try:
        proc = subprocess.run([sys.executable, "-m", "ipq_index.cli", *[a.format(built=built) for a in argv]],
                              stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=120, env=env)
    finally:
        os.close(write_end)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""


def test_datasets_fetch_failure_removes_the_directories_it_made(tmp_path, capsys):
    nested = tmp_path / "a" / "b" / "c"
    code, _, err = run(["datasets", "fetch", "glove-25-angular", "--dir", nested,
                        "--base-url", "http://127.0.0.1:9", "--timeout", 5], capsys)
    assert_one_line_error(code, err, "cannot reach")
    assert list(tmp_path.iterdir()) == []
    # a directory that was there before stays, with what it held
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "other.txt").write_text("x")
    code, _, err = run(["datasets", "fetch", "glove-25-angular", "--dir", keep / "new",
                        "--base-url", "http://127.0.0.1:9", "--timeout", 5], capsys)
    assert_one_line_error(code, err, "cannot reach")
    assert [p.name for p in keep.iterdir()] == ["other.txt"]
    code, _, err = run(["datasets", "fetch", "glove-25-angular", "--dir", keep,
                        "--base-url", "http://127.0.0.1:9", "--timeout", 5], capsys)
    assert_one_line_error(code, err, "cannot reach")
    assert [p.name for p in keep.iterdir()] == ["other.txt"]
