"""``ShardedIndex``: one ipq_index index per shard, the shards held by Dask
workers, one encoder for all of them; and ``load`` for saved ones.

Where shards live: each shard is the in-memory result of a Dask task (a
``Future`` held by the client) on one worker.  A search calls one actor per
worker (``_worker.ShardServer``), straight from the client, which searches
the shards in its worker's memory; a shard it does not answer for is
searched by a task that depends on the shard's future, which the scheduler
runs where the shard is (the shard reports its real size,
``_worker.Shard``, so moving it would cost more than waiting for that
worker).  Nothing but queries and top-k results crosses the network during
a search.

Faults: a task's description (function + arguments + the keys it depends
on) stays with the scheduler while the client holds the shard's future.
When a worker dies, the scheduler runs the lost tasks again elsewhere: a
built shard is rebuilt from its inputs (dask.array blocks recomputed from
their own graph, files read again, NumPy rows that were sent with the task),
an opened shard is mapped again from its file.  See docs/distributed.md.
"""

from __future__ import annotations

import inspect
import os
import uuid
import warnings
from numbers import Integral

import numpy as np

from .. import index_factory
from ..encoder import check_matrix
from ..structures.base import _check_ids
from . import _manifest, _worker
from ._worker import ShardFileError

__all__ = ["ShardedIndex", "load", "ShardFileError"]

#: seconds to wait for a search actor to start on a worker (then the task path serves that worker's shards)
ACTOR_START_TIMEOUT = 30


def _client(client):
    """The given ``dask.distributed.Client``, else the current one."""
    from distributed import Client, get_client

    if client is None:
        try:
            return get_client()
        except ValueError:
            raise ValueError("no Dask client: pass client=, or create a dask.distributed.Client first "
                             "(e.g. Client(LocalCluster(n_workers=2)))") from None
    if not isinstance(client, Client):
        raise TypeError(f"client must be a dask.distributed.Client, got {type(client).__name__}")
    return client


def _workers(client) -> list[str]:
    """Addresses of the cluster's workers, sorted (the shard placement rule)."""
    try:
        info = client.scheduler_info(n_workers=-1)
    except TypeError:  # versions without the n_workers argument list every worker
        info = client.scheduler_info()
    workers = sorted(info["workers"])
    if not workers:
        raise RuntimeError("the Dask cluster has no workers")
    return workers


def _positive(value, name):
    if isinstance(value, bool) or not isinstance(value, Integral) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def _is_file_entry(f) -> bool:
    """A path, or a (path, dataset) pair: an entry of a list of input files."""
    if isinstance(f, tuple) and len(f) == 2:
        f = f[0]
    return isinstance(f, (str, os.PathLike))


def _is_dask_array(x) -> bool:
    return type(x).__module__.startswith("dask.") and hasattr(x, "to_delayed") and hasattr(x, "chunks")


class ShardedIndex:
    """An index split into ``n_shards`` single-node indexes held by Dask workers.

    ``spec`` and ``settings`` are those of ``ipq_index.index_factory``; every
    shard is one such index, all sharing the encoder learnt by ``train``,
    so scores from different shards are comparable and the merged top-k is
    exact over the shards' results.  ``client``: a
    ``dask.distributed.Client`` (default: the current one).
    ``shard_threads``: threads of each shard task (default: the worker's
    thread count).  ``direct_search`` (attribute, default True): searches go
    straight to one actor per worker (``_worker.ShardServer``), falling back
    to scheduler tasks for any shard it does not answer for; False: tasks only.

        sh = ShardedIndex(384, "PCA,IVF1024,ASQ4,Rerank2", n_shards=8, client=client)
        sh.train(sample)
        sh.add(dask_array)             # or a NumPy array, or a list of .npy / HDF5 paths
        scores, ids = sh.search(Q, 10, nprobe=32)
        sh.save("/shared/index")       # or an fsspec URL
        sh = ipq_index.distributed.load("/shared/index", client=client)
    """

    def __init__(self, d, spec, n_shards, client=None, *, shard_threads=None, **settings):
        self.d = _positive(d, "d")
        self.n_shards = _positive(n_shards, "n_shards")
        self.shard_threads = None if shard_threads is None else _positive(shard_threads, "shard_threads")
        # validates spec and settings now, on the client; kept to make each train's fresh index
        self._settings = dict(settings)
        proto = index_factory(self.d, spec, **settings)
        self.spec = proto.spec
        self._search_signature = inspect.signature(proto.search)  # checks search parameters on the client
        self.client = _client(client)
        self._trained = None  # the trained, empty index as ipq file bytes (shipped to workers)
        self._shards = [None] * self.n_shards  # Futures of _worker.Shard
        self._stats = [None] * self.n_shards
        self._sizes = [0] * self.n_shards
        self._where = [None] * self.n_shards  # the worker holding each shard (tasks on it run there)
        self._servers = {}  # worker address -> its ShardServer actor (the search fast path)
        self.direct_search = True
        self._next_id = 0
        self._round = 0  # add calls so far (task names)
        self._token = uuid.uuid4().hex[:12]
        self.source = None  # the manifest's location for a loaded index

    # -- properties ----------------------------------------------------------------
    @property
    def is_trained(self) -> bool:
        return self._trained is not None

    @property
    def ntotal(self) -> int:
        return int(sum(self._sizes))

    def __len__(self):
        return self.ntotal

    @property
    def shard_sizes(self) -> list[int]:
        return list(self._sizes)

    @property
    def nbytes(self) -> int:
        """RAM bytes of all shards (as last reported by the workers)."""
        return int(sum(s["nbytes"] for s in self._stats if s))

    @property
    def stored_nbytes(self) -> int:
        """Bytes the shards' files hold for their vectors (``IndexBase.stored_nbytes``, summed)."""
        return int(sum(s["stored_nbytes"] for s in self._stats if s))

    def __repr__(self):
        return (f"ShardedIndex(d={self.d}, spec={self.spec!r}, n_shards={self.n_shards}, ntotal={self.ntotal}, "
                f"trained={self.is_trained})")

    def _on(self, s, workers=None):
        """Task options that run a task on the worker holding shard s (any worker if it is gone):
        the shard never moves, and a lost one is rebuilt wherever the scheduler chooses."""
        where = self._where[s] or (workers[s % len(workers)] if workers else None)
        return {"workers": [where], "allow_other_workers": True} if where else {}

    def placement(self) -> dict[int, list[str]]:
        """Shard number -> addresses of the workers holding it now."""
        live = {f.key: s for s, f in enumerate(self._shards) if f is not None}
        held = self.client.who_has([f for f in self._shards if f is not None])
        return {live[k]: sorted(v) for k, v in held.items() if k in live}

    def info(self) -> dict:
        """What ``ipq info`` shows of a sharded index."""
        return {"kind": "sharded", "spec": self.spec, "d": self.d, "n_shards": self.n_shards,
                "ntotal": self.ntotal, "shard_sizes": self.shard_sizes, "next_id": self._next_id,
                "nbytes": self.nbytes, "stored_nbytes": self.stored_nbytes, "source": self.source}

    # -- build -----------------------------------------------------------------------
    def train(self, X_sample, queries=None, *, max_rows=262_144, seed=0):
        """Learn the one encoder (and IVF centroids) of all shards, here on the
        client, from a sample.  A dask.array sample longer than ``max_rows``
        is subsampled (``seed``) before it is computed; the encoder keeps its
        own ``sample_size`` limit.  Like the single-node index, an index that
        holds vectors cannot be retrained."""
        if self.ntotal:
            raise RuntimeError(f"the index holds {self.ntotal} vectors encoded with the current quantizer: "
                               "create a new index to retrain")
        X_sample = self._sample(X_sample, max_rows, seed)
        if queries is not None and _is_dask_array(queries):
            queries = queries.compute()
        index = index_factory(self.d, self.spec, **self._settings)
        index.train(X_sample, queries)
        self._trained = _worker.index_bytes(index)
        return self

    @classmethod
    def from_trained(cls, index, n_shards, client=None, *, shard_threads=None) -> "ShardedIndex":
        """A sharded index whose shards use the encoder of ``index``, a trained
        single-node index holding no vectors (e.g. ``reference_index()`` of
        another sharded index, or one trained and saved earlier)."""
        if not index.is_trained or index.ntotal:
            raise ValueError(f"from_trained needs a trained index without vectors, got {index!r}")
        sh = cls(index.d, index.spec, n_shards, client, shard_threads=shard_threads)
        sh._trained = _worker.index_bytes(index)
        return sh

    def _sample(self, X, max_rows, seed):
        if not _is_dask_array(X):
            return X
        if X.ndim != 2 or X.shape[1] != self.d:
            raise ValueError(f"training data must be (n, {self.d}), got shape {X.shape}")
        n = X.shape[0]
        if n > max_rows:
            rows = np.sort(np.random.default_rng(seed).choice(n, max_rows, replace=False))
            X = X[rows]
        return X.compute()

    def reference_index(self):
        """A single-node index with this index's trained encoder and no vectors
        (for comparisons: adding the same rows gives the same codes)."""
        self._require_trained("reference_index")
        return _worker.index_from_bytes(self._trained)

    def _require_trained(self, what):
        if not self.is_trained:
            raise RuntimeError(f"the index is not trained: call train() before {what}()")

    def add(self, X, ids=None, *, on_duplicate="replace"):
        """Add rows to the shards, built on the workers in parallel.

        ``X``: a dask.array (blocks computed on the workers), a NumPy array
        (sent with the tasks), or a list of files read by the workers (``.npy``
        paths, HDF5 paths, dataset ``train``, or ``(path, dataset)`` pairs;
        local paths every worker can read, or fsspec URLs).  ``ids``: int64 >= 0,
        one per row (NumPy or dask.array); default: 0..n-1 continuing after
        the largest id so far, as in the single-node index.

        Rows go to shards by position: of this call's n rows, shard s gets
        rows [s*n//S, (s+1)*n//S).  An id the index already holds (in any
        shard) is an update, as in the single-node index: its old vector is
        removed (``on_duplicate="replace"``), or the call raises and changes
        nothing (``"error"``).  The call returns when every shard is built;
        if any shard fails, the index is left as it was.
        """
        self._require_trained("add")
        if on_duplicate not in ("replace", "error"):
            raise ValueError(f'on_duplicate must be "replace" or "error", got {on_duplicate!r}')
        n, pieces = self._pieces(X)
        if n == 0:
            raise ValueError("vectors is empty (0 rows)")
        bounds = [s * n // self.n_shards for s in range(self.n_shards + 1)]
        id_pieces, next_id = self._id_pieces(ids, n, bounds)
        replaced = None  # every id of the call, removed from each shard first (explicit ids only)
        if ids is not None and self.ntotal:
            replaced = [p for s in range(self.n_shards) for p in id_pieces[s]]
            if on_duplicate == "error":
                held = self._count_ids(replaced)
                if held:
                    raise ValueError(f"{held} of the ids are already in the index: remove them first or pass "
                                     "on_duplicate='replace'")
        import dask

        futures = []
        workers = _workers(self.client)
        self._round += 1
        try:
            for s in range(self.n_shards):
                a, b = bounds[s], bounds[s + 1]
                if a == b and self._shards[s] is not None and (replaced is None or not self._sizes[s]):
                    futures.append(self._shards[s])  # nothing new for this shard
                    continue
                task = dask.delayed(_worker.add_rows, pure=False)(
                    self._shards[s], self._trained, s, pieces(a, b), id_pieces[s], self.shard_threads,
                    replaced, dask_key_name=f"ipq-shard-{self._token}-add{self._round}-{s}")
                with warnings.catch_warnings():
                    # NumPy rows travel inside the tasks on purpose: the scheduler keeps them, so a
                    # shard lost with its worker can be rebuilt (Dask warns about large graphs)
                    warnings.filterwarnings("ignore", message=".*[Ll]arge.*graph.*")
                    futures.append(self.client.compute(task, **self._on(s, workers)))
            stats = self.client.gather([self.client.submit(_worker.shard_stats, f, pure=False, **self._on(s, workers))
                                        for s, f in enumerate(futures)])
        except BaseException:
            new = [f for s, f in enumerate(futures) if f is not self._shards[s]]
            if new:
                self.client.cancel(new)
            raise
        self._shards = futures
        self._stats = stats
        self._sizes = [st["ntotal"] for st in stats]
        self._where = [st["worker"] for st in stats]
        self._next_id = max([next_id] + [st["max_id"] + 1 for st in stats])
        return self

    def _count_ids(self, pieces) -> int:
        """How many of the ids in ``pieces`` the shards hold."""
        live = [s for s in range(self.n_shards) if self._sizes[s]]
        return int(sum(self.client.gather([self.client.submit(_worker.count_ids, self._shards[s], pieces,
                                                              pure=False, **self._on(s)) for s in live])))

    def remove_ids(self, ids) -> int:
        """Remove the vectors with these ids from whichever shards hold them
        (ids not in the index are ignored); returns how many were removed.
        Each shard's worker removes its rows (``IndexBase.remove_ids``:
        tombstones, compacted past the setting ``compact_share``); if any
        shard fails, the index is left as it was."""
        self._require_trained("remove_ids")
        ids = np.unique(_check_ids(ids, None))
        live = [s for s in range(self.n_shards) if self._sizes[s]]
        if not ids.size or not live:
            return 0
        futures = {}
        try:
            for s in live:
                futures[s] = self.client.submit(_worker.remove_rows, self._shards[s], s, ids, pure=False,
                                                **self._on(s))
            stats = dict(zip(live, self.client.gather([self.client.submit(_worker.shard_stats, futures[s], pure=False,
                                                                           **self._on(s)) for s in live])))
        except BaseException:
            self.client.cancel(list(futures.values()))
            raise
        before = self.ntotal
        for s in live:
            self._shards[s] = futures[s]
            self._stats[s] = stats[s]
            self._sizes[s] = stats[s]["ntotal"]
            self._where[s] = stats[s]["worker"]
        return before - self.ntotal

    def _pieces(self, X):
        """(n, pieces(a, b)): the row count and a function giving the input
        pieces of rows [a, b) (see ``_worker.read_piece``)."""
        if isinstance(X, (list, tuple)) and X and all(_is_file_entry(f) for f in X):
            return self._file_pieces(list(X))
        if _is_dask_array(X):
            if X.ndim != 2:
                raise ValueError(f"vectors must be a 2-D (n, d) array, got shape {X.shape}")
            if X.shape[1] != self.d:
                raise ValueError(f"vectors has dimension {X.shape[1]}, expected {self.d}")
            if any(np.isnan(c) for c in X.chunks[0]):
                X = X.compute_chunk_sizes()
            if len(X.chunks[1]) > 1:
                X = X.rechunk({1: -1})  # whole rows per block: one piece per row block
            return int(X.shape[0]), lambda a, b: list(X[a:b].to_delayed().ravel()) if b > a else []
        X = check_matrix(X, self.d, "vectors")
        return X.shape[0], lambda a, b: [X[a:b]] if b > a else []

    def _file_pieces(self, files):
        """Pieces from a list of files: their shapes are read on the workers."""
        specs = []
        for f in files:
            if isinstance(f, tuple) and len(f) == 2:
                path, dataset = os.fspath(f[0]), str(f[1])
            else:
                path = os.fspath(f)
                low = path.lower()
                if low.endswith(".npy"):
                    dataset = None
                elif low.endswith((".h5", ".hdf5")):
                    dataset = "train"
                else:
                    raise ValueError(f"{path}: input files must be .npy or HDF5 (.h5/.hdf5; or a (path, dataset) pair)")
            specs.append((_manifest.local_path(path) if not _manifest.is_url(path) else path, dataset))
        shapes = self.client.gather(self.client.map(_worker.file_rows, *zip(*specs), pure=False))
        starts = [0]
        for (path, _), (rows, cols) in zip(specs, shapes):
            if cols != self.d:
                raise ValueError(f"{path}: vectors have dimension {cols}, expected {self.d}")
            starts.append(starts[-1] + rows)

        def pieces(a, b):
            out = []
            for (path, dataset), s0, s1 in zip(specs, starts, starts[1:]):
                lo, hi = max(a, s0), min(b, s1)
                if lo < hi:
                    out.append(("file", path, dataset, lo - s0, hi - s0))
            return out

        return starts[-1], pieces

    def _id_pieces(self, ids, n, bounds):
        """Per shard, the ids of its rows (("range", a, b) or pieces) and the
        next default id after this call."""
        S = self.n_shards
        if ids is None:
            start = self._next_id
            if start + n - 1 > np.iinfo(np.int64).max:
                raise ValueError(f"default ids continue after the largest id {start - 1}: {n} more overflow int64 "
                                 "(pass ids explicitly)")
            return [("range", start + bounds[s], start + bounds[s + 1]) for s in range(S)], start + n
        if _is_dask_array(ids):
            if ids.shape != (n,) or not np.issubdtype(ids.dtype, np.integer):
                raise ValueError(f"ids must be {n} integers, got shape {ids.shape} dtype {ids.dtype}")
            return [list(ids[bounds[s]:bounds[s + 1]].to_delayed().ravel()) for s in range(S)], self._next_id
        arr = np.asarray(ids)
        if arr.shape != (n,) or not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"ids must be {n} integers, got shape {arr.shape} dtype {arr.dtype}")
        arr = arr.astype(np.int64)
        if (arr < 0).any():
            raise ValueError("ids must be non-negative (-1 marks an empty result slot)")
        return [[arr[bounds[s]:bounds[s + 1]]] for s in range(S)], max(self._next_id, int(arr.max()) + 1)

    # -- search ------------------------------------------------------------------------
    def search(self, Q, k, **params):
        """Top-k over all shards: (scores float32 (nq, k) descending, ids int64
        (nq, k)), -inf / -1 in empty slots; the single-node contract.

        The queries go to every non-empty shard (each returns its top
        min(k, rows)); the results are merged exactly, equal scores ordered by
        id.  ``params`` are the single-node search parameters (``fs``,
        ``rerank``, ``nprobe``, ``ef``, ``num_threads`` per shard,
        ``return_std``: then a third array)."""
        if not self.is_trained:
            raise RuntimeError("the index is not trained: call train() and add() first")
        if not self.ntotal:
            raise RuntimeError("the index is empty: call add() before search()")
        if _is_dask_array(Q):
            Q = Q.compute()
        Q = check_matrix(Q, self.d, "queries")
        if isinstance(k, bool) or not isinstance(k, Integral) or k < 1:
            raise ValueError(f"k must be a positive int, got {k!r}")
        k = int(k)
        if k > self.ntotal:
            raise ValueError(f"k={k} exceeds the number of indexed vectors ({self.ntotal})")
        try:
            self._search_signature.bind(Q, k, **params)
        except TypeError as e:
            raise ValueError(f"search parameters {sorted(params)}: {e} ({self.spec})") from None
        params = dict(params)
        threads = params.pop("num_threads", self.shard_threads)
        live = [s for s in range(self.n_shards) if self._sizes[s]]
        found = self._search_direct(live, Q, k, params, threads) if self.direct_search else {}
        rest = [s for s in live if s not in found]
        if rest:
            # shards the actors did not answer for (worker lost, shard not in its memory): tasks,
            # which the scheduler runs where the shard is, or reruns after rebuilding a lost one
            futures = [self.client.submit(_worker.search_shard, self._shards[s], Q, min(k, self._sizes[s]), params,
                                          threads, pure=False, **self._on(s)) for s in rest]
            for s, (result, where) in zip(rest, self.client.gather(futures)):
                found[s] = result
                self._where[s] = where  # moves only when a lost shard was rebuilt elsewhere
        return merge_topk([found[s] for s in live], k)

    def _search_direct(self, live, Q, k, params, threads) -> dict:
        """The fast path: each worker's ShardServer actor searches the shards
        it holds; returns shard -> result for those answered.  One coroutine
        on the client's event loop calls every worker at once, straight to
        the worker (``actor_execute``, the handler Dask's own actor calls
        use) whatever the client's ``direct_to_workers``: no scheduler in
        the path and one hand-off between the caller's thread and the loop.
        Any failure (a worker gone, an actor lost with it) leaves that
        worker's shards to the task path, which raises a real error again
        if there is one."""
        by_worker = {}
        for s in live:
            if self._where[s] is not None:
                # plain ints: the request travels as a plain value (``_ask_actors``)
                by_worker.setdefault(self._where[s], []).append((int(s), self._shards[s].key,
                                                                 int(min(k, self._sizes[s]))))
        found = {}
        for w, result in self._ask_actors(by_worker, Q, params, threads).items():
            if result is None:
                self._servers.pop(w, None)
            else:
                found.update(result)
        return found

    def _ask_actors(self, requests, Q, params, threads) -> dict:
        """worker -> its ShardServer's answer to ``requests[worker]`` ((shard,
        key, k) triples), or None when the worker, its actor or the call
        failed: one coroutine on the client's event loop calls every worker
        at once, straight to the worker (``actor_execute``, the handler
        Dask's own actor calls use)."""
        actors = {}
        for w in requests:
            try:
                actors[w] = self._server(w).key
            except Exception:  # noqa: BLE001 - any failure: no answer from this worker
                self._servers.pop(w, None)
        out = dict.fromkeys(requests)
        if not actors:
            return out
        import asyncio

        from distributed.protocol import to_serialize

        client = self.client

        queries = _worker.pack_arrays([Q])  # plain values (``ShardServer``) where Dask's messages allow
        threads = int(threads) if isinstance(threads, np.integer) else threads  # e.g. np.int64: not a plain value
        if not all(v is None or type(v) in (bool, int, float, str) for v in params.values()):
            params = to_serialize(params)  # e.g. a filter object

        async def ask(w):
            try:
                reqs = requests[w]
                reqs = reqs if all(type(key) is str for _, key, _ in reqs) else to_serialize(reqs)
                reply = await client.rpc(w).actor_execute(function="search", actor=actors[w],
                                                          args=[reqs, queries, params, threads], kwargs={})
                if reply.get("status") != "OK":
                    return w, None
                return w, {s: _worker.unpack_arrays(result) for s, result in reply["result"]}
            except Exception:  # noqa: BLE001 - as above
                return w, None

        async def ask_all():
            return await asyncio.gather(*(ask(w) for w in actors))

        out.update(client.sync(ask_all))
        return out

    def _server(self, worker):
        """The worker's ShardServer actor, started on first use (an actor is
        bound to its worker: none is started for a worker that is gone)."""
        server = self._servers.get(worker)
        if server is None:
            if worker not in _workers(self.client):
                raise LookupError(f"worker {worker} is gone")
            server = self.client.submit(_worker.ShardServer, actor=True, workers=[worker], allow_other_workers=False,
                                        pure=False).result(timeout=ACTOR_START_TIMEOUT)
            self._servers[worker] = server
        return server

    def warmup(self) -> "ShardedIndex":
        """Compile kernels and build derived search structures on every shard's worker."""
        sizes = self.client.gather([self.client.submit(_worker.warmup_shard, f, pure=False, **self._on(s))
                                    for s, f in enumerate(self._shards) if self._sizes[s]])
        for st, nb in zip((st for st, size in zip(self._stats, self._sizes) if size), sizes):
            st["nbytes"] = nb
        return self

    # -- persistence ---------------------------------------------------------------------
    def save(self, path) -> None:
        """Write one ipq file per shard (each by its worker) and the trained
        encoder, then the checksummed manifest, last and atomically, in the
        directory ``path`` (local, shared by the workers, or an fsspec URL).
        A failed save writes no manifest (an earlier one stays valid) and
        removes the files it wrote."""
        self._require_trained("save")
        base = path if _manifest.is_url(path) else _manifest.local_path(os.fspath(path))
        if not str(base):
            raise ValueError("path is empty")
        _manifest.make_dir(base)
        gen = uuid.uuid4().hex[:12]
        enc_name = f"encoder-{gen}.ipq"
        names = [f"shard-{s:05d}-{gen}.ipq" for s in range(self.n_shards)]
        written = [enc_name, *names]
        futures = []
        try:
            enc_target = _manifest.join(base, enc_name)
            _worker.save_shard(_worker.Shard(_worker.index_from_bytes(self._trained), -1), enc_target)
            enc_ident = _worker.file_identity(enc_target)
            todo = [(s, f) for s, f in enumerate(self._shards) if f is not None]
            futures = [self.client.submit(_worker.save_shard, f, _manifest.join(base, names[s]), pure=False,
                                          **self._on(s)) for s, f in todo]
            idents = dict(zip((s for s, _ in todo), self.client.gather(futures)))
            missing = [s for s in range(self.n_shards) if s not in idents]
            if missing:  # shards never given rows (fewer add rows than shards): an empty trained index each
                empty = _worker.Shard(_worker.index_from_bytes(self._trained), -1)
                for s in missing:
                    idents[s] = _worker.save_shard(empty, _manifest.join(base, names[s]))
            record = {"d": self.d, "spec": self.spec, "n_shards": self.n_shards, "ntotal": self.ntotal,
                      "next_id": self._next_id, "generation": gen, "library": "ipq_index",
                      "encoder": {"file": enc_name, **enc_ident},
                      "shards": [{"file": names[s], "ntotal": self._sizes[s], **idents[s]}
                                 for s in range(self.n_shards)]}
            _manifest.write(base, record)
        except BaseException:
            for f in futures:
                f.cancel()
            for name in written:
                _manifest.remove(_manifest.join(base, name))
            raise
        _manifest.remove_stale(base, set(written))

    def close(self) -> None:
        """Release the shards (the workers drop them)."""
        live = [f for f in self._shards if f is not None]
        if live:
            self.client.cancel(live)
        self._shards = [None] * self.n_shards
        self._servers = {}


def merge_topk(parts, k):
    """Merge per-shard results (each (scores, ids[, extra...]), (nq, k_s)) into
    the top-k per query: scores descending, equal scores by ascending id
    (so the order does not depend on how rows were split into shards)."""
    scores = np.concatenate([p[0] for p in parts], axis=1)
    ids = np.concatenate([p[1] for p in parts], axis=1)
    order = np.lexsort((ids, -scores), axis=-1)[:, :k]
    out = [np.take_along_axis(scores, order, axis=1), np.take_along_axis(ids, order, axis=1)]
    for j in range(2, len(parts[0])):
        out.append(np.take_along_axis(np.concatenate([p[j] for p in parts], axis=1), order, axis=1))
    return tuple(out)


def load(path, client=None, *, verify=True) -> ShardedIndex:
    """Open a sharded index saved by ``ShardedIndex.save``: each worker
    memory-maps its shards (a remote file is first copied to a local cache).

    The manifest's checksum is verified; each shard file must be the one the
    manifest names (size and header CRC) and pass ``ipq_index.load`` (array
    CRC32s unless ``verify=False``), else ``ShardFileError`` names the shard."""
    client = _client(client)
    base = path if _manifest.is_url(path) else _manifest.local_path(os.fspath(path))
    rec = _manifest.read(base)
    trained_file = _manifest.join(base, rec["encoder"]["file"])
    try:
        enc_local = _worker._local_copy(trained_file, rec["encoder"]) if _manifest.is_url(base) else trained_file
        if _worker.file_identity(enc_local) != {k: rec["encoder"][k] for k in ("size", "header_crc32")}:
            raise ShardFileError(f"{trained_file}: encoder file is not the one the manifest names")
        from .. import load as load_index

        trained = _worker.index_bytes(load_index(enc_local, mmap=False, verify=verify))
    except ShardFileError:
        raise
    except (OSError, ValueError) as e:
        raise ShardFileError(f"encoder ({trained_file}): {e}") from None
    sh = ShardedIndex(rec["d"], rec["spec"], rec["n_shards"], client)
    sh._trained = trained
    sh.source = str(base)
    workers = _workers(client)
    futures = []
    for s, entry in enumerate(rec["shards"]):
        expected = {"size": entry["size"], "header_crc32": entry["header_crc32"], "ntotal": entry["ntotal"],
                    "d": rec["d"], "spec": rec["spec"]}
        target = _manifest.join(base, entry["file"])
        futures.append(client.submit(_worker.open_shard, target, s, rec["n_shards"], expected, verify,
                                     key=f"ipq-shard-{sh._token}-open-{s}",
                                     workers=[workers[s % len(workers)]], allow_other_workers=True))
    try:
        stats = client.gather([client.submit(_worker.shard_stats, f, pure=False, workers=[workers[s % len(workers)]],
                                             allow_other_workers=True) for s, f in enumerate(futures)])
    except BaseException:
        client.cancel(futures)
        raise
    sh._shards = futures
    sh._stats = stats
    sh._sizes = [st["ntotal"] for st in stats]
    sh._where = [st["worker"] for st in stats]
    sh._next_id = int(rec["next_id"])
    return sh
