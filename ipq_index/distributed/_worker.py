"""What runs on the Dask workers: the shard holder (``Shard``) and the tasks
that build, search, save and open shards.

Every task here is a plain module-level function of plain arguments, so a
task's description alone (function, arguments, the keys it depends on) is
enough for Dask to run it again on another worker: that is how a shard lost
with its worker is rebuilt (see ``docs/distributed.md``, fault model).

Imports only numpy and ipq_index at module level; fsspec and h5py are
imported by the tasks that need them.
"""

from __future__ import annotations

import copy
import os
import struct
import tempfile

import numpy as np

from .. import load as _load_index
from ..storage import FormatError

#: bytes 12..16 of an ipq file hold the CRC32 of its JSON header (ipq_index.storage),
#: and the header lists every array's CRC32: (file size, header CRC) pins a file's contents
_PREFIX = struct.Struct("<8sIIQ")
#: where shards read from a remote (fsspec) location are copied before they are memory-mapped
CACHE_DIR_ENV = "IPQ_SHARD_CACHE"


class ShardFileError(FormatError):
    """A shard file of a sharded index is missing, damaged, or not the file
    its manifest names (the message names the shard and the file)."""


class Shard:
    """One shard: a single-node index held in the memory of the worker that
    built or opened it, as the result of a Dask task.

    ``sys.getsizeof`` (what Dask's ``sizeof`` uses for unknown objects)
    reports the index's bytes, so the scheduler sees a shard as expensive
    to move and runs each search task on the worker that holds the shard.
    When Dask must still move or spill it, a shard opened from a file
    pickles as that file's location (the receiver maps it again) and a
    built one as the bytes of its ipq file."""

    __slots__ = ("index", "number", "source")

    def __init__(self, index, number: int, source=None):
        self.index = index
        self.number = int(number)
        self.source = source  # open_shard's arguments when the shard was opened from a file

    def __sizeof__(self):
        return int(self.index.nbytes) + 64

    def __reduce__(self):
        if self.source is not None:
            return open_shard, self.source
        return _shard_from_bytes, (index_bytes(self.index), self.number)

    def __repr__(self):
        return f"Shard({self.number}, {self.index!r})"


# -- bytes of an index (the trained encoder is shipped to workers this way) ---------
def index_bytes(index) -> bytes:
    """The ipq file of ``index`` as bytes (written to a temporary file: the
    format is defined by ``save``)."""
    if index.ntotal == 0 and index.rerank and index.vectors is None:
        # a trained index with no vectors yet has no re-rank copy, and ``load`` wants one when
        # the spec has ``Rerank``: save a copy of the index holding an empty (0, d) one
        index = copy.copy(index)
        index.vectors = np.zeros((0, index.d), index.rerank_dtype)
    fd, tmp = tempfile.mkstemp(suffix=".ipq", prefix="ipq-shard-")
    os.close(fd)
    try:
        index.save(tmp)
        with open(tmp, "rb") as f:
            return f.read()
    finally:
        _unlink(tmp)


def index_from_bytes(data: bytes):
    """An index read back from ``index_bytes`` (in memory, not mapped)."""
    fd, tmp = tempfile.mkstemp(suffix=".ipq", prefix="ipq-shard-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return _load_index(tmp, mmap=False)
    finally:
        _unlink(tmp)


def _shard_from_bytes(data, number):
    return Shard(index_from_bytes(data), number)


def _unlink(path):
    try:
        os.unlink(path)
    except OSError:
        pass


# -- threads ------------------------------------------------------------------------
def worker_threads(num_threads):
    """Threads of one shard task: ``num_threads`` when given, else the
    worker's thread count (each Dask worker thread runs one task: the
    shard's kernels then use the cores the worker was given, not all the
    machine's)."""
    if num_threads is not None:
        return num_threads
    try:
        from distributed import get_worker

        w = get_worker()
        n = getattr(getattr(w, "state", None), "nthreads", None) or getattr(w, "nthreads", None)
        return max(1, int(n)) if n else -1
    except (ImportError, ValueError):  # not on a worker (the client's own process)
        return -1


# -- input pieces ---------------------------------------------------------------
def file_rows(path, dataset):
    """(rows, columns) of an input file (a task: run where the file is)."""
    if dataset is None and not _is_url(path):
        shape = np.load(path, mmap_mode="r").shape
    elif dataset is None:
        with _open_binary(path) as f:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape = read(f)[0]
    else:
        import h5py

        with _open_binary(path) as raw, h5py.File(raw, "r") as h:
            shape = h[dataset].shape
    if len(shape) != 2:
        raise ValueError(f"{path}: expected a 2-D (n, d) array, got shape {tuple(shape)}")
    return int(shape[0]), int(shape[1])


def read_piece(piece) -> np.ndarray:
    """A piece of a shard's input: an array (given, or computed by Dask
    from a dask.array block), or ``("file", path, dataset, start, stop)``
    read here, on the worker."""
    if not (isinstance(piece, tuple) and piece and piece[0] == "file"):
        return np.asarray(piece)
    _, path, dataset, a, b = piece
    if dataset is None:
        if _is_url(path):
            with _open_binary(path) as f:
                return np.load(f)[a:b]
        return np.array(np.load(path, mmap_mode="r")[a:b])
    import h5py

    with _open_binary(path) as raw, h5py.File(raw, "r") as h:
        return np.asarray(h[dataset][a:b])


def _rows(pieces):
    arrays = [read_piece(p) for p in pieces]
    if not arrays:
        return None
    return arrays[0] if len(arrays) == 1 else np.concatenate(arrays)


# -- tasks ----------------------------------------------------------------------
def add_rows(shard, trained, number, pieces, ids, num_threads, replaced=None):
    """Shard ``number`` after adding its rows of one ``add`` call: a new
    ``Shard`` (the previous one, ``shard``, is left as it was, so a failed
    add elsewhere can keep it); ``shard`` None starts from the trained,
    empty index ``trained`` (bytes).  ``ids``: ("range", start, stop) or
    pieces like the rows' (None: no rows).  ``replaced``: pieces of every
    id the call adds (to any shard), removed from this shard first: an id
    held by another shard moves with its new vector."""
    index = index_from_bytes(trained) if shard is None else copy.copy(shard.index)
    if replaced is not None and index.ntotal:
        gone = _rows(replaced)
        if gone is not None:
            index.remove_ids(gone)
    X = _rows(pieces)
    if X is not None and X.shape[0]:
        if isinstance(ids, tuple) and ids and ids[0] == "range":
            id_arr = np.arange(ids[1], ids[2], dtype=np.int64)
        else:
            id_arr = _rows(ids)
        if id_arr.shape[0] != X.shape[0]:
            raise ValueError(f"shard {number}: {X.shape[0]} rows but {id_arr.shape[0]} ids")
        # a copy of the index (arrays shared, never written: add concatenates into new
        # ones) so the previous shard stays valid for the scheduler and for a failed add
        index.add(X, ids=id_arr, num_threads=worker_threads(num_threads))
    return Shard(index, number)


def remove_rows(shard, number, ids):
    """Shard ``number`` without the rows of ``ids``: a new ``Shard`` (the
    previous one is left as it was)."""
    index = copy.copy(shard.index)
    index.remove_ids(ids)
    return Shard(index, number)


def count_ids(shard, pieces):
    """How many of the ids in ``pieces`` the shard holds."""
    ids = _rows(pieces)
    if ids is None or not shard.index.ntotal:
        return 0
    return int(shard.index._live_rows_of(np.asarray(ids, np.int64)).size)


def shard_stats(shard):
    """What the client keeps about a shard: rows, largest id (-1: none), bytes."""
    idx = shard.index
    return {"worker": _address(), "ntotal": idx.ntotal, "max_id": int(np.asarray(idx.ids).max()) if idx.ntotal else -1,
            "nbytes": int(idx.nbytes), "stored_nbytes": int(idx.stored_nbytes)}


def search_shard(shard, Q, k, params, num_threads):
    """The shard's own top-k (the single-node contract) and the address of
    the worker that ran the search (it holds the shard)."""
    return shard.index.search(Q, k, num_threads=worker_threads(num_threads), **params), _address()


class ShardServer:
    """A Dask actor, one per worker: searches shards that are in its worker's
    memory, called by the client directly (no scheduler in the path: one
    round trip instead of the several a task takes).  A shard it does not
    find is left out of the answer; the client then searches it with an
    ordinary task, which the scheduler reruns or rebuilds as needed.

    The queries come and the results go as plain bytes (``pack_arrays``),
    which Dask's messages carry as they are: its serialization of numpy
    arguments and results cost 0.4-0.5 ms of a round trip of about 1 ms
    (2 local workers, one query)."""

    #: at most this many queries are searched on the worker's event loop itself (a
    #: few hundred microseconds; saves two thread hand-offs per call), more on a thread
    INLINE_QUERIES = 8

    def __init__(self):
        from distributed import get_worker

        self._worker = get_worker()
        self._threads = worker_threads(None)

    async def search(self, requests, queries, params, num_threads):
        """The top-k of the queries ``queries`` (``pack_arrays`` of one (nq,
        d) array) in each shard of ``requests`` ((shard, key, k) triples)
        this worker holds: [shard, ``pack_arrays`` of its result] pairs."""
        Q = unpack_arrays(queries)[0]
        if Q.shape[0] <= self.INLINE_QUERIES:
            out = self._search(requests, Q, params, num_threads)
        else:
            import asyncio

            out = await asyncio.get_running_loop().run_in_executor(None, self._search, requests, Q, params,
                                                                   num_threads)
        return [[s, pack_arrays(result)] for s, result in out.items()]

    def _search(self, requests, Q, params, num_threads):
        data = self._worker.data
        threads = self._threads if num_threads is None else num_threads
        out = {}
        for s, key, k in requests:
            try:
                shard = data[key]
            except KeyError:
                continue
            out[s] = shard.index.search(Q, k, num_threads=threads, **params)
        return out


def pack_arrays(arrays) -> list:
    """Arrays as plain values for a Dask message: [bytes, dtype, shape] each
    (``unpack_arrays`` inverts it)."""
    return [[a.tobytes(), a.dtype.str, list(a.shape)] for a in map(np.ascontiguousarray, arrays)]


def unpack_arrays(packed) -> tuple:
    """The arrays of ``pack_arrays``, writeable (a search kernel compiles
    once per array type, and read-only is another type)."""
    return tuple(np.frombuffer(data, np.dtype(dtype)).reshape(shape).copy() for data, dtype, shape in packed)


def _address():
    try:
        from distributed import get_worker

        return get_worker().address
    except (ImportError, ValueError):
        return None


def warmup_shard(shard):
    shard.index.warmup()
    return shard.index.nbytes


def save_shard(shard, target):
    """Write the shard's ipq file to ``target`` (local path or fsspec URL);
    returns its (size, header CRC32) for the manifest."""
    if not _is_url(target):
        shard.index.save(target)
        return file_identity(target)
    import fsspec

    fs, path = fsspec.core.url_to_fs(target)
    fd, tmp = tempfile.mkstemp(suffix=".ipq", prefix="ipq-shard-")
    os.close(fd)
    try:
        shard.index.save(tmp)
        ident = file_identity(tmp)
        part = path + ".part"
        fs.put_file(tmp, part)
        fs.mv(part, path)
    finally:
        _unlink(tmp)
    return ident


def file_identity(path):
    """(size, header CRC32) of an ipq file (local or URL)."""
    with _open_binary(path) as f:
        prefix = f.read(_PREFIX.size)
        size = f.seek(0, os.SEEK_END)
    if len(prefix) < _PREFIX.size:
        raise FormatError(f"{path}: not an ipq file (only {len(prefix)} bytes)")
    magic, _, header_crc, _ = _PREFIX.unpack(prefix)
    if magic != b"IPQINDEX":
        raise FormatError(f"{path}: not an ipq file (bad magic)")
    return {"size": int(size), "header_crc32": int(header_crc)}


def open_shard(target, number, n_shards, expected, verify=True):
    """Open shard ``number`` (of ``n_shards``) from its file, memory-mapped
    (a remote file is first copied to a local cache), after checking it is
    the file the manifest describes (``expected``: size, header CRC32, rows,
    d, spec).  Any problem raises ``ShardFileError`` naming the shard."""
    what = f"shard {number} of {n_shards} ({target})"
    try:
        local = _local_copy(target, expected) if _is_url(target) else target
        if not os.path.exists(local):
            raise ShardFileError(f"{what}: file is missing")
        ident = file_identity(local)
        if ident["size"] != expected["size"] or ident["header_crc32"] != expected["header_crc32"]:
            raise ShardFileError(f"{what}: file is not the one the manifest names (size {ident['size']} / "
                                 f"header CRC {ident['header_crc32']:#010x}, manifest: {expected['size']} / "
                                 f"{expected['header_crc32']:#010x}): damaged or replaced")
        index = _load_index(local, mmap=True, verify=verify)
    except ShardFileError:
        raise
    except (FormatError, OSError) as e:
        msg = str(e)
        for prefix in (f"{target}: ", f"{target} "):  # the path is in ``what`` already
            msg = msg[len(prefix):] if msg.startswith(prefix) else msg
        raise ShardFileError(f"{what}: {msg}") from None
    if index.ntotal != expected["ntotal"] or index.d != expected["d"] or index.spec != expected["spec"]:
        raise ShardFileError(f"{what}: holds {index.ntotal} vectors of d={index.d}, spec {index.spec!r}; the manifest "
                             f"says {expected['ntotal']}, d={expected['d']}, {expected['spec']!r}")
    return Shard(index, number, source=(target, number, n_shards, expected, False))


# -- files ------------------------------------------------------------------------
def _is_url(path) -> bool:
    return "://" in str(path)


def _open_binary(path):
    if _is_url(path):
        import fsspec

        return fsspec.open(path, "rb").open()
    return open(path, "rb")


def _local_copy(url, expected):
    """A local copy of a remote shard file (kept in the cache directory, named
    by its contents' identity so a changed file is copied again)."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(url)
    if not fs.exists(path):
        raise ShardFileError(f"{url}: file is missing")
    base = os.environ.get(CACHE_DIR_ENV) or os.path.join(tempfile.gettempdir(), "ipq_shard_cache")
    os.makedirs(base, exist_ok=True)
    name = f"{os.path.basename(path)}.{expected['size']}.{expected['header_crc32']:08x}"
    local = os.path.join(base, name)
    if not os.path.exists(local):
        fd, tmp = tempfile.mkstemp(dir=base, prefix=".part-")
        os.close(fd)
        try:
            fs.get_file(path, tmp)
            os.replace(tmp, local)
        finally:
            _unlink(tmp)
    return local
