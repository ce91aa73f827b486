"""ipq_index.distributed: sharded build and search on a LocalCluster of two
worker processes (one thread each): exactness against the single-node index
with the same encoder, recall of IVF / graph shards, save / load, lost
workers during add and search, damaged files and bad input.

Workers are killed deterministically: ``_arm`` replaces a FlatIndex method in
the worker processes by one that ends its process the first time any worker
calls it (an O_EXCL marker file decides which call), so the kill happens in
the middle of the task under test; the nanny starts a fresh worker and the
scheduler reruns what was lost.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

dask = pytest.importorskip("dask")
distributed = pytest.importorskip("distributed")
import cloudpickle  # noqa: E402  (comes with distributed)
import dask.array as da  # noqa: E402
from distributed import Client, LocalCluster  # noqa: E402

import ipq_index  # noqa: E402
from ipq_index.distributed import ShardedIndex, ShardFileError, load, merge_topk  # noqa: E402

# the worker processes cannot import this test module: send its functions by value
cloudpickle.register_pickle_by_value(sys.modules[__name__])

D = 32
N = 4000


@pytest.fixture(scope="module")
def client():
    # dashboard ":0": a free port (None still binds 8787 for the scheduler's HTTP routes, and a
    # second cluster on the host, e.g. another test process's, then warns: an error here)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0",
                      worker_dashboard_address=None) as cluster, Client(cluster) as c:
        yield c


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(7)
    centers = rng.standard_normal((16, D)).astype(np.float32) * 2
    X = centers[rng.integers(0, 16, N)] + rng.standard_normal((N, D)).astype(np.float32)
    Q = centers[rng.integers(0, 16, 40)] + rng.standard_normal((40, D)).astype(np.float32)
    return X.astype(np.float32), Q.astype(np.float32)


@pytest.fixture(scope="module")
def flat(client, data):
    """A 3-shard flat index over 2 workers (uneven placement), built from a dask.array."""
    X, _ = data
    sh = ShardedIndex(D, "PCA,ASQ4n,Rerank2", 3, client)
    sh.train(X)
    sh.add(da.from_array(X, chunks=700))
    ref = sh.reference_index()
    ref.add(X)
    return sh, ref


def _arm(client, marker, method, action="exit"):
    """Make ``FlatIndex.<method>`` on every current worker end its process
    (``action="exit"``) or raise OSError (``"raise"``) on the first call
    anywhere (the one that creates ``marker``); later calls run normally."""
    def install(marker, method, action):
        import os

        from ipq_index.structures import FlatIndex

        own = method in FlatIndex.__dict__  # else inherited from IndexBase
        original = getattr(FlatIndex, method)

        def hooked(self, *args, **kwargs):
            if action == "raise":
                raise OSError(f"injected failure in FlatIndex.{method}")
            try:
                os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                return original(self, *args, **kwargs)
            os._exit(1)

        hooked._original = original if own else None
        setattr(FlatIndex, method, hooked)

    client.run(install, str(marker), method, action)


def _disarm(client, method):
    def uninstall(method):
        from ipq_index.structures import FlatIndex

        current = FlatIndex.__dict__.get(method)
        if hasattr(current, "_original"):
            if current._original is None:
                delattr(FlatIndex, method)
            else:
                setattr(FlatIndex, method, current._original)

    client.run(uninstall, method)


def _recall(ids, truth):
    return float(np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(ids, truth)]))


# -- exactness ----------------------------------------------------------------------
@pytest.mark.parametrize("params", [{"fs": 0}, {"rerank": 0, "fs": 0}, {}])
def test_sharded_flat_topk_equals_single_node(flat, data, params):
    sh, ref = flat
    _, Q = data
    s, i = sh.search(Q, 10, **params)
    rs, ri = ref.search(Q, 10, **params)
    assert s.dtype == np.float32 and i.dtype == np.int64 and s.shape == (len(Q), 10)
    np.testing.assert_array_equal(i, ri)
    np.testing.assert_array_equal(s, rs)
    # one query, and k reaching past a shard's size
    s1, i1 = sh.search(Q[:1], 10, **params)
    np.testing.assert_array_equal(i1, ri[:1])
    big = sh.search(Q[:3], 1500, fs=0, rerank=0)
    rbig = ref.search(Q[:3], 1500, fs=0, rerank=0)
    np.testing.assert_array_equal(big[1], rbig[1])
    np.testing.assert_array_equal(big[0], rbig[0])


def test_shards_stay_on_their_workers(client, flat, data):
    """Searches run where the shards are: the placement never changes.  (Where
    the shards were built is the scheduler's choice: the add tasks ask for
    worker s % workers but may be stolen by an idle worker, so the spread
    over both workers is not asserted.)"""
    sh, _ = flat
    before = sh.placement()
    assert sorted(before) == [0, 1, 2] and all(len(w) == 1 for w in before.values())
    for _ in range(3):
        sh.search(data[1], 5)
    assert sh.placement() == before
    assert sorted(sh._servers) == sorted({w[0] for w in before.values()})  # searched by the workers' actors


@pytest.mark.parametrize("params", [{"fs": 0, "rerank": 0}, {"return_std": False, "fs": 3},
                                    {"filter": "every third id", "fs": 0}])
def test_actors_answer_with_the_single_node_results(flat, data, params):
    """Each worker's actor answers for its shards (queries and results travel
    as plain bytes; a filter object, not a plain value, goes pickled), and the
    merged answers are the single-node top-k."""
    sh, ref = flat
    _, Q = data
    if "filter" in params:
        params = dict(params, filter=ipq_index.filters.AllowIds(np.arange(0, ref.ntotal, 3)))
    by_worker = {}
    for s, w in enumerate(sh._where):
        by_worker.setdefault(w, []).append((s, sh._shards[s].key, 10))
    answers = sh._ask_actors(by_worker, Q[:7], params, 1)
    assert all(a is not None and sorted(a) == [s for s, _, _ in by_worker[w]] for w, a in answers.items())
    parts = [part for a in answers.values() for part in a.values()]
    assert all(p[0].flags.writeable and p[0].dtype == np.float32 and p[1].dtype == np.int64 for p in parts)
    got = merge_topk(parts, 10)
    want = ref.search(Q[:7], 10, **params)
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_array_equal(got[0], want[0])
    if "filter" in params:
        assert np.all(got[1] % 3 == 0)


def test_numpy_and_file_inputs_continue_ids_like_single_node(client, data, tmp_path):
    import h5py

    X, Q = data
    sh = ShardedIndex(D, "PCA,ASQ4n", 2, client)
    sh.train(X)
    sh.add(X[:1000])                                      # NumPy rows, ids 0..999
    np.save(tmp_path / "a.npy", X[1000:2200])
    with h5py.File(tmp_path / "b.hdf5", "w") as f:
        f.create_dataset("train", data=X[2200:3100])
        f.create_dataset("other", data=X[3100:])
    sh.add([tmp_path / "a.npy", str(tmp_path / "b.hdf5"), (tmp_path / "b.hdf5", "other")])  # read on the workers
    assert sh.ntotal == N and sum(sh.shard_sizes) == N
    ref = sh.reference_index()
    ref.add(X[:1000])
    ref.add(X[1000:])
    s, i = sh.search(Q, 10, fs=0)
    rs, ri = ref.search(Q, 10, fs=0)
    np.testing.assert_array_equal(i, ri)
    np.testing.assert_array_equal(s, rs)
    # explicit ids (a dask.array), then defaults continue after the largest
    ids = da.from_array(np.arange(10_000, 10_050, dtype=np.int64), chunks=20)
    sh.add(da.from_array(X[:50], chunks=25), ids=ids)
    sh.add(X[:2])
    assert sh.ntotal == N + 52 and sh.info()["next_id"] == 10_052
    # rows 0 and 10_000 are the same vector (same codes, same score): merged by ascending id
    _, i = sh.search(Q, N + 52, fs=0, rerank=0)
    pos = {int(v): j for j, v in enumerate(i[0])}
    assert pos[0] < pos[10_000] and pos[10_000] + 0 < 10 ** 9 and pos[1] < pos[10_001] and 10_051 in pos


def test_remove_and_update_by_id_across_shards(client, data):
    """``remove_ids`` removes rows from whichever shards hold them and
    ``add`` with ids already held (in other shards) moves them with their new
    vectors: results equal a single-node index with the same encoder and the
    same removals and updates (brute-force ids on the exhaustive ADC);
    ``on_duplicate="error"`` raises and changes nothing."""
    X, Q = data
    sh = ShardedIndex(D, "PCA,ASQ4n", 3, client)
    sh.train(X)
    sh.add(X)
    ref = sh.reference_index()
    ref.add(X)
    gone = np.arange(0, N, 7)  # rows of every shard
    assert sh.remove_ids(np.concatenate([gone, [10 ** 6]])) == gone.size == ref.remove_ids(gone)
    assert sh.ntotal == N - gone.size
    # ids 1..200 (shard 0) and 3000..3100 (shard 2) get new vectors; the call puts them in other shards
    upd = np.concatenate([np.arange(1, 201), np.arange(3000, 3101)])
    upd = upd[upd % 7 != 0]
    newX = (X[::-1][:upd.size] + np.random.default_rng(3).standard_normal((upd.size, D))).astype(np.float32)
    with pytest.raises(ValueError, match="already in the index"):
        sh.add(newX, ids=upd, on_duplicate="error")
    assert sh.ntotal == N - gone.size
    sh.add(newX, ids=upd)
    ref.add(newX, ids=upd)
    assert sh.ntotal == ref.ntotal == N - gone.size
    s, i = sh.search(Q, 20, fs=0)
    rs, ri = ref.search(Q, 20, fs=0)
    np.testing.assert_array_equal(i, ri)
    np.testing.assert_array_equal(s, rs)
    assert not np.isin(i, gone).any()
    # an updated id is found with its new vector, once
    _, top = sh.search(newX[:5], 1, fs=0)
    np.testing.assert_array_equal(top[:, 0], upd[:5])
    _, everything = sh.search(Q[:1], sh.ntotal, fs=0)
    assert np.unique(everything).size == sh.ntotal


@pytest.mark.parametrize("spec, params", [("PCA,IVF16,ASQ4n", {"nprobe": 3}), ("PCA,HNSW16,ASQ6n", {"ef": 24})])
def test_ivf_and_graph_shards_recall_close_to_single_node(client, data, spec, params):
    X, Q = data
    truth = np.argsort(-(Q @ X.T), axis=1)[:, :10]
    sh = ShardedIndex(D, spec, 2, client)
    sh.train(X)
    sh.add(da.from_array(X, chunks=1000))
    ref = sh.reference_index()
    ref.add(X)
    r_sh = _recall(sh.search(Q, 10, **params)[1], truth)
    r_ref = _recall(ref.search(Q, 10, **params)[1], truth)
    assert r_sh >= r_ref - 0.03, (r_sh, r_ref)
    assert r_sh > 0.6
    # a second add inserts into the shards' structures (the graph links new nodes)
    extra = 3.0 * Q[:10]  # far out along the queries: each its own query's best match
    sh.add(extra)
    assert sh.ntotal == N + 10
    _, got = sh.search(Q[:10], 1, **params)
    np.testing.assert_array_equal(got[:, 0], np.arange(N, N + 10))


# -- save / load -----------------------------------------------------------------------
def test_save_load_round_trip(client, flat, data, tmp_path):
    sh, ref = flat
    _, Q = data
    path = tmp_path / "idx"
    sh.save(path)
    first = sorted(os.listdir(path))
    assert "manifest.json" in first and sum(n.startswith("shard-") for n in first) == 3
    back = load(path, client)
    assert (back.ntotal, back.shard_sizes, back.spec, back.n_shards) == (sh.ntotal, sh.shard_sizes, sh.spec, 3)
    for params in ({"fs": 0}, {}):
        np.testing.assert_array_equal(back.search(Q, 10, **params)[1], ref.search(Q, 10, **params)[1])
        np.testing.assert_array_equal(back.search(Q, 10, **params)[0], ref.search(Q, 10, **params)[0])
    # shards opened from files are memory-mapped on their workers
    def mapped(dask_worker):
        return sorted(type(np.asarray(v.index.codes).base).__name__ for v in dask_worker.data.values()
                      if type(v).__name__ == "Shard" and v.source is not None)
    kinds = [k for ks in client.run(mapped).values() for k in ks]
    assert len(kinds) >= 3 and set(kinds) == {"memmap"}
    # a loaded index takes more rows (same encoder); saving again replaces the old generation
    back.add(data[0][:5])
    back.save(path)
    again = sorted(os.listdir(path))
    assert not set(first) - {"manifest.json"} & set(again)
    assert load(path, client).ntotal == N + 5
    # an fsspec URL
    url = f"file://{tmp_path / 'viaurl'}"
    sh.save(url)
    np.testing.assert_array_equal(load(url, client).search(Q, 10, fs=0)[1], ref.search(Q, 10, fs=0)[1])


def test_damaged_or_missing_shard_file_names_the_shard(client, flat, tmp_path):
    sh, _ = flat
    path = tmp_path / "idx"
    sh.save(path)
    manifest = json.loads((path / "manifest.json").read_text())
    shard1 = path / manifest["index"]["shards"][1]["file"]
    good = shard1.read_bytes()
    # a flipped byte in the arrays: the array CRC32 check (ipq_index.load) names it
    bad = bytearray(good)
    bad[-100] ^= 0xFF
    shard1.write_bytes(bytes(bad))
    with pytest.raises(ShardFileError, match=r"shard 1 of 3 .*shard-00001-.*checksum|shard 1 of 3.*CRC"):
        load(path, client)
    # a damaged header, and a file whose header is not the one the manifest names
    bad = bytearray(good)
    bad[40] ^= 0xFF
    shard1.write_bytes(bytes(bad))
    with pytest.raises(ShardFileError, match=r"shard 1 of 3 \(.*shard-00001-.*\.ipq\): is corrupt \(header"):
        load(path, client)
    bad = bytearray(good)
    bad[13] ^= 0xFF
    shard1.write_bytes(bytes(bad))
    with pytest.raises(ShardFileError, match=r"shard 1 of 3 .*not the one the manifest names"):
        load(path, client)
    shard1.unlink()
    with pytest.raises(ShardFileError, match=r"shard 1 of 3 .*missing"):
        load(path, client)
    shard1.write_bytes(good)
    assert load(path, client).ntotal == N
    # the manifest itself is checksummed
    text = (path / "manifest.json").read_text().replace('"next_id": 4000', '"next_id": 4001')
    (path / "manifest.json").write_text(text)
    with pytest.raises(ipq_index.FormatError, match="checksum"):
        load(path, client)
    with pytest.raises(FileNotFoundError, match="no sharded index"):
        load(tmp_path / "nothing", client)


def test_failed_save_leaves_no_manifest_and_keeps_the_old_one(client, flat, data, tmp_path):
    sh, ref = flat
    path = tmp_path / "idx"
    _arm(client, tmp_path / "unused", "save", action="raise")
    try:
        with pytest.raises(OSError, match="injected"):
            sh.save(path)
        assert os.listdir(path) == []  # no manifest, and the shard files written were removed
        _disarm(client, "save")
        sh.save(path)
        before = sorted(os.listdir(path))
        _arm(client, tmp_path / "unused", "save", action="raise")
        with pytest.raises(OSError, match="injected"):
            sh.save(path)
        assert sorted(os.listdir(path)) == before  # the earlier save is intact
    finally:
        _disarm(client, "save")
    np.testing.assert_array_equal(load(path, client).search(data[1], 10, fs=0)[1], ref.search(data[1], 10, fs=0)[1])


# -- lost workers -------------------------------------------------------------------------
def test_worker_killed_during_add_gives_complete_results(client, data, tmp_path):
    X, Q = data
    sh = ShardedIndex(D, "PCA,ASQ4n", 2, client)
    sh.train(X)
    marker = tmp_path / "killed-in-add"
    _arm(client, marker, "add")
    try:
        sh.add(da.from_array(X, chunks=500))
    finally:
        _disarm(client, "add")
    assert marker.exists()  # a worker did die inside FlatIndex.add
    client.wait_for_workers(2, timeout=60)
    ref = sh.reference_index()
    ref.add(X)
    assert sh.shard_sizes == [2000, 2000]
    s, i = sh.search(Q, 10, fs=0)
    rs, ri = ref.search(Q, 10, fs=0)
    np.testing.assert_array_equal(i, ri)
    np.testing.assert_array_equal(s, rs)


@pytest.mark.parametrize("source, direct", [("built", True), ("loaded", True), ("built", False)])
def test_worker_killed_during_search_gives_complete_results(client, data, tmp_path, source, direct):
    """Killed inside an actor's search (``direct``: then the shards go to tasks) or inside a search task."""
    X, Q = data
    sh = ShardedIndex(D, "PCA,ASQ4n", 2, client)
    sh.train(X)
    sh.add(da.from_array(X, chunks=1000))  # a lost built shard is rebuilt from these blocks
    if source == "loaded":  # a lost opened shard is mapped again from its file
        sh.save(tmp_path / "idx")
        sh = load(tmp_path / "idx", client)
    sh.direct_search = direct
    ref = sh.reference_index()
    ref.add(X)
    rs, ri = ref.search(Q, 10, fs=0)
    marker = tmp_path / "killed-in-search"
    client.wait_for_workers(2, timeout=60)
    _arm(client, marker, "search")
    try:
        s, i = sh.search(Q, 10, fs=0)
    finally:
        _disarm(client, "search")
    assert marker.exists()
    np.testing.assert_array_equal(i, ri)
    np.testing.assert_array_equal(s, rs)
    client.wait_for_workers(2, timeout=60)


# -- merge and bad input ------------------------------------------------------------------
def test_merge_orders_equal_scores_by_id_and_keeps_padding_last():
    a = (np.array([[3.0, 1.0, -np.inf]], np.float32), np.array([[7, 2, -1]]))
    b = (np.array([[3.0, 2.0]], np.float32), np.array([[4, 9]]))
    s, i = merge_topk([a, b], 4)
    np.testing.assert_array_equal(i, [[4, 7, 9, 2]])
    np.testing.assert_array_equal(s, np.array([[3, 3, 2, 1]], np.float32))
    s, i = merge_topk([a, (b[0][:, :0], b[1][:, :0])], 3)
    np.testing.assert_array_equal(i, [[7, 2, -1]])


def test_bad_input_raises_clear_errors(client, flat, data, tmp_path):
    sh, _ = flat
    X, Q = data
    with pytest.raises(ValueError, match="n_shards"):
        ShardedIndex(D, "PCA,ASQ4n", 0, client)
    with pytest.raises(ValueError):
        ShardedIndex(D, "PCA,FOO,ASQ4n", 2, client)
    with pytest.raises(TypeError, match="dask.distributed.Client"):
        ShardedIndex(D, "PCA,ASQ4n", 2, client="tcp://nowhere:1")
    fresh = ShardedIndex(D, "PCA,ASQ4n", 2, client)
    with pytest.raises(RuntimeError, match="not trained"):
        fresh.add(X)
    with pytest.raises(RuntimeError, match="not trained"):
        fresh.search(Q, 1)
    fresh.train(X[:500])
    with pytest.raises(RuntimeError, match="empty"):
        fresh.search(Q, 1)
    with pytest.raises(ValueError, match="dimension 31, expected 32"):
        fresh.add(X[:, :31])
    with pytest.raises(ValueError, match="dimension 31, expected 32"):
        fresh.add(da.from_array(X[:, :31]))
    with pytest.raises(ValueError, match="non-negative"):
        fresh.add(X[:3], ids=[1, -2, 3])
    with pytest.raises(ValueError, match="ids must be 3 integers"):
        fresh.add(X[:3], ids=[1, 2])
    with pytest.raises(ValueError, match=".npy or HDF5"):
        fresh.add([tmp_path / "x.csv"])
    assert fresh.ntotal == 0
    with pytest.raises(ValueError, match="k=4001 exceeds"):
        sh.search(Q, N + 1)
    with pytest.raises(ValueError, match="k must be a positive int"):
        sh.search(Q, 0)
    with pytest.raises(ValueError, match="dimension 31, expected 32"):
        sh.search(Q[:, :31], 3)
    with pytest.raises(RuntimeError, match="holds"):
        sh.train(X)


def test_no_client_is_a_clear_error():
    code = ("from ipq_index.distributed import ShardedIndex\n"
            "try:\n    ShardedIndex(8, 'ASQ4n', 2)\nexcept ValueError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "no Dask client" in out.stdout, out.stderr


# -- command line ------------------------------------------------------------------------
def test_cli_build_info_search_on_a_sharded_index(client, data, tmp_path, capsys):
    """``ipq build --workers 2`` writes a sharded directory; ``ipq info`` reads its
    manifest; ``ipq search --scheduler`` on it gives the top-k of a single-node
    index with the same encoder over the same rows, filters included."""
    from ipq_index import cli

    X, Q = data
    np.save(tmp_path / "x.npy", X)
    np.save(tmp_path / "q.npy", Q)
    out = tmp_path / "sharded"
    assert cli.main(["build", str(tmp_path / "x.npy"), "--index", "PCA,ASQ4n", "-o", str(out), "--workers", "2",
                     "--shards", "3", "--threads", "1", "--quiet"]) == 0
    capsys.readouterr()
    assert cli.main(["info", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kind"] == "sharded" and info["n_shards"] == 3 and info["ntotal"] == N
    assert sum(info["shard_sizes"]) == N
    assert cli.main(["info", str(out)]) == 0
    assert "3 shards" in capsys.readouterr().out

    ref = ipq_index.load(out / info["encoder_file"], mmap=False)  # the trained encoder, no rows
    ref.add(X)
    address = client.scheduler.address
    allowed = np.arange(0, N, 7)
    np.save(tmp_path / "allowed.npy", allowed)
    for extra, params in (([], {}), (["--filter", str(tmp_path / "allowed.npy")], {"filter": allowed})):
        res = tmp_path / "res.npy"
        assert cli.main(["search", str(out), str(tmp_path / "q.npy"), "--k", "10", "-o", str(res),
                         "--scheduler", address, "--quiet", *extra]) == 0
        want_scores, want_ids = ref.search(Q, 10, **params)
        np.testing.assert_array_equal(np.load(res), want_ids)
        np.testing.assert_allclose(np.load(tmp_path / "res.scores.npy"), want_scores, rtol=1e-6)


def test_cli_cluster_options_are_checked(tmp_path, capsys):
    from ipq_index import cli

    np.save(tmp_path / "x.npy", np.ones((10, 4), np.float32))
    for bad, msg in ((["--workers", "0"], "--workers must be >= 1"),
                     (["--workers", "2", "--scheduler", "tcp://127.0.0.1:1"], "not both"),
                     (["--workers", "1", "--shards", "0"], "--shards must be >= 1")):
        with pytest.raises(SystemExit) as e:
            cli.main(["build", str(tmp_path / "x.npy"), "--index", "ASQ4n", "-o", str(tmp_path / "o"), *bad])
        assert e.value.code == 2 and msg in capsys.readouterr().err
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "f").write_text("x")
    with pytest.raises(SystemExit) as e:
        cli.main(["build", str(tmp_path / "x.npy"), "--index", "ASQ4n", "-o", str(tmp_path / "taken"), "--workers", "1"])
    assert e.value.code == 2 and "not a sharded index" in capsys.readouterr().err
