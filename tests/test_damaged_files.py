"""Damaged and crafted index files never crash, hang or answer wrong: every
case either raises FormatError naming the array or field and the problem,
or loads and searches exactly as the undamaged index.

Cases run in child processes (``fuzz_helpers``): a segfault in a kernel
fails the test instead of killing pytest.
"""

from __future__ import annotations

import json
import os
import struct
import zlib

import numpy as np
import pytest

import ipq_index
from ipq_index import storage

from fuzz_helpers import collect, region_of, run_in_subprocess

D, N = 32, 2000
#: one index per kind, between them: rotation or none, per-vector scales,
#: float16 and float32 re-rank copies, residual IVF codes, 4- and 6-bit fields
SPECS = {"flat": "ASQ4s,Rerank2", "ivf": "PCA,IVF16,ASQ4n,Rerank2F32", "hnsw": "PCA,HNSW16,ASQ6n"}
#: the flat and IVF indexes take the fast-scan paths at this size too
OPTIONS = {"flat": {"fastscan_min_rows": 512}, "ivf": {"fastscan_min_rows": 512}, "hnsw": {}}
#: words a rejection of a damaged prefix or header names
HEADER_WORDS = ("magic", "version", "header", "truncated")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """{kind: path of the saved index}, the queries' path and the work directory."""
    work = tmp_path_factory.mktemp("damaged")
    rng = np.random.default_rng(0)
    X = (rng.standard_normal((N, D)) * np.linspace(2.0, 0.1, D)).astype(np.float32)
    paths = {}
    for kind, spec in SPECS.items():
        idx = ipq_index.index_factory(D, spec, **OPTIONS[kind]).train(X).add(X)
        paths[kind] = str(work / f"{kind}.ipq")
        idx.save(paths[kind])
    qpath = str(work / "queries.npy")
    np.save(qpath, (X[:16] + 0.1 * rng.standard_normal((16, D))).astype(np.float32))
    return paths, qpath, work


def _entries(path):
    meta, entries, size = storage.read_header(path)
    with open(path, "rb") as f:
        hlen = struct.unpack("<Q", f.read(24)[16:24])[0]
    return meta, entries, size, 24 + hlen


def _flip_offsets(entries, header_end, size, per_array, rng):
    """Offsets spread over the prefix, the header and every array (start,
    end, middle and random ones), and the padding after the header."""
    at = set(range(0, 24, 3)) | {24, 25, header_end - 1, header_end // 2, header_end + 1}
    at |= set(int(x) for x in rng.integers(24, header_end, 3))
    for e in entries.values():
        o, nb = e["offset"], e["nbytes"]
        if nb:
            at |= {o, o + nb - 1, o + nb // 2}
            at |= set(int(x) for x in rng.integers(o, o + nb, per_array))
    return sorted(a for a in at if a < size)


def _flip_cases(paths, mmaps, verify, per_array, stride=None):
    cases = []
    rng = np.random.default_rng(1)
    for kind, path in paths.items():
        _, entries, size, header_end = _entries(path)
        offs = range(0, size, stride) if stride else _flip_offsets(entries, header_end, size, per_array, rng)
        for i, at in enumerate(offs):
            for mmap in mmaps:
                cases.append({"id": f"{kind}:flip@{at}:{'mmap' if mmap else 'read'}:v{int(verify)}",
                              "kind": kind, "base": path, "op": "flip", "at": at,
                              "mask": (0xFF, 0x01, 0x80, 0x10)[i % 4], "mmap": mmap, "verify": verify,
                              "region": region_of(entries, at, header_end), "header": at < header_end})
    return cases


def _truncate_cases(paths):
    cases = []
    for kind, path in paths.items():
        _, entries, size, header_end = _entries(path)
        cuts = {0, 7, 12, 23, 24, 100, header_end - 1, header_end, size - 1}
        for e in entries.values():
            cuts |= {e["offset"], e["offset"] + e["nbytes"] // 2}
        for cut in sorted(c for c in cuts if c < size):
            for mmap in (True, False):
                cases.append({"id": f"{kind}:truncate@{cut}:{'mmap' if mmap else 'read'}", "kind": kind,
                              "base": path, "op": "truncate", "size": cut, "mmap": mmap, "verify": True})
    return cases


# -- crafted files with valid checksums ---------------------------------------

def _set(name, fn):
    """A mutation replacing array ``name`` by fn(copy of it)."""
    def mutate(meta, arrays):
        a = np.array(arrays[name])
        arrays[name] = fn(a)
    return mutate


def _put(name, index, value):
    def fn(a):
        a[index] = value
        return a
    return _set(name, fn)


def _meta(path, value):
    """A mutation setting (value is not _DROP) or removing a meta field; path: keys from the top."""
    def mutate(meta, arrays):
        d = meta
        for k in path[:-1]:
            d = d[k]
        if value is _DROP:
            del d[path[-1]]
        else:
            d[path[-1]] = value(d[path[-1]]) if callable(value) else value
    return mutate


_DROP = object()


def _drop(name):
    def mutate(meta, arrays):
        del arrays[name]
    return mutate


def _first_coded(a):
    return int(np.nonzero(a > 0)[0][0])


def _shift_past_byte(meta, arrays):
    """A field of 2+ bits moved to bit 7 (runs past its byte)."""
    j = int(np.nonzero(np.asarray(arrays["enc.bits"]) >= 2)[0][0])
    shift = np.array(arrays["enc.shift_of"])
    shift[j] = 7
    arrays["enc.shift_of"] = shift


def _swap_levels(a):
    a[1], a[2] = a[2] + 1.0, a[1]  # levels of dimension 0 out of order
    return a


def _overlap_shift(meta, arrays):
    """Two coded fields of one byte moved to the same bits."""
    bits, byte, shift = (np.array(arrays[f"enc.{k}"]) for k in ("bits", "byte_of", "shift_of"))
    for g in np.unique(byte[bits > 0]):
        js = np.nonzero((byte == g) & (bits > 0))[0]
        if js.size > 1:
            shift[js[1]] = shift[js[0]]
            arrays["enc.shift_of"] = shift
            return
    raise AssertionError("no byte with two fields")


def _upper_link_to_ground(meta, arrays):
    """A level-1 neighbour slot pointing at a node that has level 0 only."""
    off, cum, nb = (np.array(arrays[f"graph.{k}"]) for k in ("offsets", "cum", "neighbors"))
    span = np.diff(off)
    up = int(np.nonzero(span > cum[1])[0][0])
    ground = int(np.nonzero(span == cum[1])[0][0])
    nb[off[up] + cum[1]] = ground
    arrays["graph.neighbors"] = nb


def _entry_not_top(meta, arrays):
    off, cum, entry = (np.array(arrays[f"graph.{k}"]) for k in ("offsets", "cum", "entry"))
    entry[0] = int(np.nonzero(np.diff(off) == cum[1])[0][0])  # a node with level 0 only
    arrays["graph.entry"] = entry


def _offsets_shift(a):
    a[5:-1] += 1  # node 4 gets one slot more, the last one less
    return a


def _offsets_swap(a):
    a[3], a[4] = a[4], a[3]
    return a


COMMON = [
    # encoder layout
    ("bits 9", _put("enc.bits", 0, 9), ["enc.bits"]),
    ("bits -1", _put("enc.bits", 0, -1), ["enc.bits"]),
    ("bits +1", _set("enc.bits", lambda a: (a.__setitem__(_first_coded(a), a[_first_coded(a)] + 1), a)[1]),
     ["enc.level_off", "enc.shift_of", "enc.bits"]),
    ("bits 0 on a coded dim", _set("enc.bits", lambda a: (a.__setitem__(_first_coded(a), 0), a)[1]),
     ["enc.level_off"]),
    ("byte_of out of range", _set("enc.byte_of", lambda a: a + 1000), ["enc.byte_of"]),
    ("byte_of negative", _put("enc.byte_of", 3, -1), ["enc.byte_of"]),
    ("shift_of past the byte", _shift_past_byte, ["enc.shift_of"]),
    ("shift_of 8", _put("enc.shift_of", 0, 8), ["enc.shift_of"]),
    ("fields overlap", _overlap_shift, ["enc.shift_of"]),
    ("levels NaN", _put("enc.levels", 5, np.nan), ["enc.levels"]),
    ("levels inf", _put("enc.levels", 0, np.inf), ["enc.levels"]),
    ("levels huge, still sorted", _set("enc.levels", lambda a: (a.__setitem__(-1, 1e300), a)[1]), ["enc.levels"]),
    ("levels shortened", _set("enc.levels", lambda a: a[:-3]), ["enc.levels"]),
    ("levels unsorted", _set("enc.levels", _swap_levels), ["enc.levels"]),
    ("level_off shifted", _set("enc.level_off", lambda a: (a.__setitem__(slice(5, None), a[5:] + 1), a)[1]),
     ["enc.level_off"]),
    ("level_off non-monotone", _set("enc.level_off", lambda a: (a.__setitem__(3, a[5]), a)[1]),
     ["enc.level_off"]),
    ("level_off start", _set("enc.level_off", lambda a: a + 1), ["enc.level_off"]),
    ("level_off short", _set("enc.level_off", lambda a: a[:-1]), ["enc.level_off"]),
    ("mean NaN", _put("enc.mean", 3, np.nan), ["enc.mean"]),
    ("mean short", _set("enc.mean", lambda a: a[:-1]), ["enc.mean"]),
    ("energy inf", _put("enc.energy", 3, np.inf), ["enc.energy"]),
    ("energy negative", _put("enc.energy", 3, -1.0), ["enc.energy"]),
    ("bits int64", _set("enc.bits", lambda a: a.astype(np.int64)), ["enc.bits"]),
    ("levels float32", _set("enc.levels", lambda a: a.astype(np.float32)), ["enc.levels"]),
    ("bits 2-D", _set("enc.bits", lambda a: a.reshape(2, -1)), ["enc.bits"]),
    # rows
    ("codes rows short", _set("codes", lambda a: a[:-1]), ["codes"]),
    ("codes too wide", _set("codes", lambda a: np.concatenate([a, a[:, :1]], axis=1)), ["codes"]),
    ("codes int8", _set("codes", lambda a: a.view(np.int8)), ["codes"]),
    ("codes 1-D", _set("codes", lambda a: a.reshape(-1)), ["codes"]),
    ("ids negative", _put("ids", 7, -3), ["ids"]),
    ("ids short", _set("ids", lambda a: a[:-1]), ["ids"]),
    ("ids float", _set("ids", lambda a: a.astype(np.float64)), ["ids"]),
    ("vectors NaN", _put("vectors", (4, 2), np.nan), ["vectors"]),
    ("vectors rows short", _set("vectors", lambda a: a[:-2]), ["vectors"]),
    ("vectors other dtype", _set("vectors", lambda a: a.astype(np.float64)), ["vectors"]),
    ("vectors missing", _drop("vectors"), ["vectors"]),
    ("codes missing", _drop("codes"), ["codes"]),
    ("ids missing", _drop("ids"), ["ids"]),
    ("levels missing", _drop("enc.levels"), ["enc.levels"]),
    ("level_off missing", _drop("enc.level_off"), ["enc.level_off"]),
    ("bits missing", _drop("enc.bits"), ["enc.bits"]),
    ("energy missing", _drop("enc.energy"), ["enc.energy"]),
    ("extra array", lambda m, a: a.__setitem__("bogus", np.zeros(3)), ["bogus"]),
    # meta fields
    ("meta d missing", _meta(["d"], _DROP), ["'d'"]),
    ("meta d string", _meta(["d"], "32"), ["'d'"]),
    ("meta d zero", _meta(["d"], 0), ["'d'"]),
    ("meta d float", _meta(["d"], 32.0), ["'d'"]),
    ("meta d other", _meta(["d"], 16), ["'d'", "encoder.d"]),
    ("meta d both other", lambda m, a: (m.__setitem__("d", 16), m["encoder"].__setitem__("d", 16)),
     ["enc.mean", "enc.bits"]),
    ("meta ntotal missing", _meta(["ntotal"], _DROP), ["'ntotal'"]),
    ("meta ntotal negative", _meta(["ntotal"], -1), ["'ntotal'"]),
    ("meta ntotal other", _meta(["ntotal"], lambda v: v + 1), ["'codes'"]),
    ("meta ntotal bool", _meta(["ntotal"], True), ["'ntotal'"]),
    ("meta kind unknown", _meta(["kind"], "bogus"), ["'kind'"]),
    ("meta kind list", _meta(["kind"], ["flat"]), ["'kind'"]),
    ("meta kind missing", _meta(["kind"], _DROP), ["'kind'"]),
    ("meta library", _meta(["library"], _DROP), ["'library'"]),
    ("meta rerank string", _meta(["rerank"], "2"), ["'rerank'"]),
    ("meta rerank negative", _meta(["rerank"], -1), ["'rerank'"]),
    ("meta rerank_dtype", _meta(["rerank_dtype"], "float64"), ["rerank_dtype"]),
    ("meta rerank_dtype other", _meta(["rerank_dtype"], lambda v: "float32" if v == "float16" else "float16"),
     ["'vectors'"]),
    ("meta spec", _meta(["spec"], 5), ["'spec'"]),
    ("meta settings list", _meta(["settings"], [1]), ["settings"]),
    ("meta settings bad value", _meta(["settings", "fs"], "x"), ["settings"]),
    ("meta settings unknown", _meta(["settings", "bogus"], 1), ["settings"]),
    ("meta encoder missing", _meta(["encoder"], _DROP), ["'encoder'"]),
    ("meta encoder list", _meta(["encoder"], []), ["'encoder'"]),
    ("meta encoder.nbytes", _meta(["encoder", "nbytes"], lambda v: v + 1), ["'codes'", "enc.byte_of"]),
    ("meta encoder.nbytes zero", _meta(["encoder", "nbytes"], 0), ["encoder.nbytes"]),
    ("meta encoder.nbytes string", _meta(["encoder", "nbytes"], "16"), ["encoder.nbytes"]),
    ("meta encoder.config missing", _meta(["encoder", "config"], _DROP), ["encoder.config"]),
    ("meta encoder.config list", _meta(["encoder", "config"], [1]), ["encoder.config"]),
    ("meta encoder.config unknown", _meta(["encoder", "config", "bogus"], 1), ["encoder.config"]),
    ("meta encoder.config bits", _meta(["encoder", "config", "bits"], "4"), ["encoder.config"]),
    ("meta encoder.config transform", _meta(["encoder", "config", "transform"], "bogus"), ["encoder.config"]),
    ("meta encoder.config transform other",
     _meta(["encoder", "config", "transform"], lambda v: "none" if v != "none" else "pca"), ["enc.rotation"]),
    ("meta encoder.config scale other", _meta(["encoder", "config", "scale"], lambda v: not v), ["scales"]),
    ("meta encoder.config scale int", _meta(["encoder", "config", "scale"], lambda v: int(v)), ["scale"]),
    ("meta encoder.config max_bits", _meta(["encoder", "config", "max_bits"], 1), ["enc.bits"]),
    ("meta encoder.config seed", _meta(["encoder", "config", "seed"], "x"), ["seed"]),
    ("meta encoder.config rounding", _meta(["encoder", "config", "rounding"], 1), ["encoder.config"]),
]
ROTATION = [
    ("rotation not orthogonal", _set("enc.rotation", lambda a: a * 2), ["enc.rotation"]),
    ("rotation NaN", _put("enc.rotation", (1, 1), np.nan), ["enc.rotation"]),
    ("rotation missing", _drop("enc.rotation"), ["enc.rotation"]),
    ("rotation short", _set("enc.rotation", lambda a: a[:-1]), ["enc.rotation"]),
]
SCALES = [
    ("scales NaN", _put("scales", 9, np.nan), ["scales"]),
    ("scales short", _set("scales", lambda a: a[:-1]), ["scales"]),
    ("scales missing", _drop("scales"), ["scales"]),
]
IVF = [
    ("assign = nlist", _put("ivf.assign", 11, 16), ["ivf.assign"]),
    ("assign negative", _put("ivf.assign", 11, -1), ["ivf.assign"]),
    ("assign huge", _put("ivf.assign", 0, 2**31 - 1), ["ivf.assign"]),
    ("assign short", _set("ivf.assign", lambda a: a[:-1]), ["ivf.assign"]),
    ("assign int64", _set("ivf.assign", lambda a: a.astype(np.int64)), ["ivf.assign"]),
    ("centroids NaN", _put("ivf.centroids", (2, 3), np.nan), ["ivf.centroids"]),
    ("centroid beyond the magnitude bound", _put("ivf.centroids", (2, 3), 1e20), ["ivf.centroids"]),
    ("centroids rows short", _set("ivf.centroids", lambda a: a[:-1]), ["ivf.centroids"]),
    ("centroids missing", _drop("ivf.centroids"), ["ivf.centroids"]),
    ("assign missing", _drop("ivf.assign"), ["ivf.assign"]),
    ("meta nlist other", _meta(["nlist"], 8), ["ivf.centroids"]),
    ("meta nlist missing", _meta(["nlist"], _DROP), ["'nlist'"]),
    ("meta nlist string", _meta(["nlist"], "16"), ["'nlist'"]),
]
GRAPH = [
    ("neighbor = ntotal", _put("graph.neighbors", 40, N), ["graph.neighbors"]),
    ("neighbor -2", _put("graph.neighbors", 40, -2), ["graph.neighbors"]),
    ("neighbor huge", _put("graph.neighbors", 0, 2**31 - 1), ["graph.neighbors"]),
    ("neighbor int64", _set("graph.neighbors", lambda a: a.astype(np.int64)), ["graph.neighbors"]),
    ("neighbors short", _set("graph.neighbors", lambda a: a[:-1]), ["graph.offsets"]),
    ("upper link to level-0 node", _upper_link_to_ground, ["graph.neighbors"]),
    ("entry = ntotal", _put("graph.entry", 0, N), ["graph.entry"]),
    ("entry -1", _put("graph.entry", 0, -1), ["graph.entry"]),
    ("entry not on the top level", _entry_not_top, ["graph.entry"]),
    ("max level +1", _set("graph.entry", lambda a: (a.__setitem__(1, a[1] + 1), a)[1]), ["graph.entry"]),
    ("max level 50", _put("graph.entry", 1, 50), ["graph.entry"]),
    ("max level -1", _put("graph.entry", 1, -1), ["graph.entry"]),
    ("entry short", _set("graph.entry", lambda a: a[:1]), ["graph.entry"]),
    ("offsets non-monotone", _set("graph.offsets", _offsets_swap), ["graph.offsets"]),
    ("offsets shifted", _set("graph.offsets", _offsets_shift), ["graph.offsets"]),
    ("offsets short", _set("graph.offsets", lambda a: a[:-1]), ["graph.offsets"]),
    ("offsets end", _set("graph.offsets", lambda a: (a.__setitem__(-1, a[-1] + 32), a)[1]), ["graph.offsets"]),
    ("cum shortened", _set("graph.cum", lambda a: a[:2]), ["graph.offsets", "graph.entry"]),
    ("cum non-increasing", _put("graph.cum", 2, 32), ["graph.cum"]),
    ("cum start", _set("graph.cum", lambda a: a + 1), ["graph.cum"]),
    ("cum empty", _set("graph.cum", lambda a: a[:0]), ["graph.cum"]),
    ("cum missing", _drop("graph.cum"), ["graph.cum"]),
    ("meta M missing", _meta(["M"], _DROP), ["'M'"]),
]


def _header_rewrite(fn):
    """A crafted header: fn(doc) edits the parsed header {"meta", "arrays"} in place."""
    return ("header", fn)


def _entry(name, key, value):
    def fn(doc):
        if value is _DROP:
            del doc["arrays"][name][key]
        else:
            e = doc["arrays"][name]
            e[key] = value(e[key]) if callable(value) else value
    return _header_rewrite(fn)


def _overlap(doc):
    doc["arrays"]["ids"]["offset"] = doc["arrays"]["codes"]["offset"]


HEADERS = [
    ("dtype big-endian", _entry("enc.levels", "dtype", ">f8"), ["enc.levels", "dtype"]),
    ("dtype object", _entry("codes", "dtype", "|O"), ["codes", "dtype"]),
    ("dtype complex", _entry("enc.levels", "dtype", "<c16"), ["enc.levels", "dtype"]),
    ("dtype name", _entry("enc.levels", "dtype", "float64"), ["enc.levels", "dtype"]),
    ("dtype garbage", _entry("enc.levels", "dtype", "zz9"), ["enc.levels", "dtype"]),
    ("dtype int", _entry("enc.levels", "dtype", 5), ["enc.levels", "dtype"]),
    ("dtype structured", _entry("ids", "dtype", "[('a', '<i4')]"), ["ids", "dtype"]),
    ("shape string", _entry("codes", "shape", "x"), ["codes", "shape"]),
    ("shape negative", _entry("enc.bits", "shape", [-32]), ["enc.bits", "shape"]),
    ("shape float", _entry("enc.bits", "shape", [32.0]), ["enc.bits", "shape"]),
    ("shape other", _entry("enc.bits", "shape", [16]), ["enc.bits", "nbytes"]),
    ("shape bool", _entry("enc.bits", "shape", [True]), ["enc.bits", "shape"]),
    ("offset unaligned", _entry("ids", "offset", lambda v: v + 8), ["ids", "offset"]),
    ("offset in header", _entry("ids", "offset", 0), ["ids", "offset"]),
    ("offset past the end", _entry("ids", "offset", lambda v: v + 10**9), ["ids", "truncated"]),
    ("offset string", _entry("ids", "offset", "64"), ["ids", "offset"]),
    ("offset huge", _entry("ids", "offset", 2**70), ["ids"]),
    ("nbytes other", _entry("ids", "nbytes", lambda v: v - 8), ["ids", "nbytes"]),
    ("nbytes negative", _entry("ids", "nbytes", -8), ["ids", "nbytes"]),
    ("crc32 string", _entry("ids", "crc32", "x"), ["ids", "crc32"]),
    ("crc32 wide", _entry("ids", "crc32", 2**40), ["ids", "crc32"]),
    ("crc32 missing", _entry("ids", "crc32", _DROP), ["ids", "keys"]),
    ("entry extra key", _entry("ids", "extra", 1), ["ids", "keys"]),
    ("entry list", _header_rewrite(lambda d: d["arrays"].__setitem__("ids", [1, 2])), ["ids"]),
    ("arrays overlap", _header_rewrite(_overlap), ["overlap"]),
    ("arrays list", _header_rewrite(lambda d: d.__setitem__("arrays", [])), ["arrays"]),
    ("meta list", _header_rewrite(lambda d: d.__setitem__("meta", [])), ["meta"]),
    ("meta missing", _header_rewrite(lambda d: d.pop("meta")), ["meta"]),
    ("doc extra key", _header_rewrite(lambda d: d.__setitem__("more", 1)), ["header"]),
    ("raw not json", ("raw", b"{not json"), ["unreadable"]),
    ("raw not utf-8", ("raw", b'{"meta": "\xff\xfe"}'), ["unreadable"]),
    ("raw deep nesting", ("raw", b"[" * 100000 + b"]" * 100000), ["unreadable"]),
    ("raw list", ("raw", b"[1, 2]"), ["header"]),
    ("raw NaN d", ("raw_meta", lambda t: t.replace(b'"d": 32', b'"d": NaN')), ["'d'"]),
]


def _write_header(raw, header: bytes, path):
    """The file ``raw`` with its header replaced (checksum and length updated,
    arrays where they were); the new header may grow into the slack."""
    hlen = struct.unpack("<Q", raw[16:24])[0]
    data = bytearray(raw)
    first = min(e["offset"] for e in json.loads(raw[24:24 + hlen])["arrays"].values())
    # a header longer than the slack moves the arrays: append the data after it
    if 24 + len(header) > first:
        tail = raw[24 + hlen:]
        data = bytearray(storage._PREFIX.size) + header + tail
    else:
        data[24:first] = header + bytes(first - 24 - len(header))
    data[:24] = storage._PREFIX.pack(storage.MAGIC, storage.FORMAT_VERSION, zlib.crc32(header) & 0xFFFFFFFF,
                                     len(header))
    path.write_bytes(bytes(data))


def _crafted_cases(paths, work):
    cases = []
    by_kind = {"flat": COMMON + SCALES, "ivf": COMMON + ROTATION + IVF, "hnsw": COMMON + ROTATION + GRAPH}
    for kind, path in paths.items():
        meta0, arrays0 = storage.load_arrays(path, mmap=False)
        with open(path, "rb") as f:
            raw = f.read()
        hlen = struct.unpack("<Q", raw[16:24])[0]
        for n, (label, mutate, words) in enumerate(by_kind[kind] + HEADERS):
            if ("vectors" in label or label == "meta rerank_dtype other") and "vectors" not in arrays0:
                continue  # the graph index keeps no re-rank copy
            out = work / f"crafted_{kind}_{n}.ipq"
            if isinstance(mutate, tuple):
                how, arg = mutate
                if how == "header":
                    doc = json.loads(raw[24:24 + hlen])
                    arg(doc)
                    _write_header(raw, json.dumps(doc, sort_keys=True).encode(), out)
                elif how == "raw":
                    _write_header(raw, arg, out)
                else:  # raw_meta: a byte-level edit of the header text
                    text = arg(raw[24:24 + hlen])
                    assert text != raw[24:24 + hlen], label
                    _write_header(raw, text, out)
            else:
                meta, arrays = json.loads(json.dumps(meta0)), dict(arrays0)
                mutate(meta, arrays)
                storage.save_arrays(out, meta, arrays)
            for mmap in (True, False):
                cases.append({"id": f"{kind}:crafted:{label}:{'mmap' if mmap else 'read'}", "kind": kind,
                              "base": path, "op": "file", "path": str(out), "mmap": mmap, "verify": True,
                              "words": words})
    return cases


# -- running and judging -------------------------------------------------------

def _run(cases, saved, tmp_path, parts=2):
    """Run the cases in ``parts`` child processes at once; {id: (outcome, detail)}.
    Fails the test on a crash, a hang or a non-zero exit."""
    paths, qpath, work = saved
    chunks = [cases[i::parts] for i in range(parts)]
    procs = [run_in_subprocess({"queries": qpath, "workdir": str(work), "cases": c}, tmp_path) for c in chunks]
    results = {}
    for chunk, p in zip(chunks, procs):
        got, crashed_at, status, err = collect(p)
        assert crashed_at is None and status == 0, \
            f"the child process crashed or hung (status {status}) at case {crashed_at!r}:\n{err}"
        assert len(got) == len(chunk), f"{len(chunk) - len(got)} cases not reported:\n{err}"
        results.update(got)
    return results


def _tally(results):
    counts = {}
    for outcome, _ in results.values():
        counts[outcome] = counts.get(outcome, 0) + 1
    return counts


def _judge(cases, results, strict=True):
    """Every case rejected with a message naming the damaged array (or the
    header, or the expected words) or loaded with the undamaged results
    (``strict=False``: or loaded with other results: the unchecked mode)."""
    bad = []
    for case in cases:
        outcome, detail = results[case["id"]]
        if outcome == "error":
            bad.append((case["id"], outcome, detail))
        elif outcome == "differs" and strict:
            bad.append((case["id"], outcome, "wrong results from a loaded file"))
        elif outcome == "rejected":
            if "words" in case:
                words = case["words"]
            elif case.get("region"):
                words = [repr(case["region"])]
            elif case["op"] == "truncate":
                words = ["truncated", "magic"]
            else:
                words = list(HEADER_WORDS)
            if not any(w in detail for w in words):
                bad.append((case["id"], outcome, f"message names none of {words}: {detail}"))
        elif "words" in case:
            bad.append((case["id"], outcome, "a crafted file was accepted"))
        elif case["op"] == "flip" and strict and case["region"] is not None:
            bad.append((case["id"], outcome, "a checksummed array was damaged and accepted"))
    assert not bad, f"{len(bad)} of {len(cases)} cases failed:\n" + "\n".join(map(str, bad[:40]))


def test_flipped_bytes_are_rejected_or_harmless(saved, tmp_path):
    """A byte flipped anywhere (prefix, header, every array, padding), read
    or memory-mapped: the checksums reject it, naming the array."""
    cases = _flip_cases(saved[0], (True, False), verify=True, per_array=2)
    results = _run(cases, saved, tmp_path)
    print(f"flips, verified: {len(cases)} cases, {_tally(results)}")
    _judge(cases, results)


def test_flipped_bytes_unverified_never_crash(saved, tmp_path):
    """``verify=False`` (trusted files): a flipped byte may change results
    but must never crash or hang; the validation rejects what kernels
    cannot index safely (widths, offsets, ids, assignments, neighbours)."""
    cases = _flip_cases(saved[0], (True,), verify=False, per_array=4)
    results = _run(cases, saved, tmp_path)
    print(f"flips, unverified: {len(cases)} cases, {_tally(results)}")
    _judge(cases, results, strict=False)


def test_truncated_files_are_rejected(saved, tmp_path):
    cases = _truncate_cases(saved[0])
    results = _run(cases, saved, tmp_path)
    print(f"truncations: {len(cases)} cases, {_tally(results)}")
    _judge(cases, results)
    assert all(outcome == "rejected" for outcome, _ in results.values())


def test_crafted_files_with_valid_checksums_are_rejected(saved, tmp_path):
    """Files whose checksums are valid but whose contents are not what
    ``save`` writes (bit width 9, out-of-range assignments, neighbours and
    entry points, wrong row counts, NaN levels, shortened or unsorted
    levels, non-monotone offsets, missing arrays and meta keys, wrong types,
    malformed header entries): FormatError naming the array or field."""
    cases = _crafted_cases(saved[0], saved[2])
    results = _run(cases, saved, tmp_path)
    print(f"crafted: {len(cases)} cases, {_tally(results)}")
    _judge(cases, results)
    assert all(outcome == "rejected" for outcome, _ in results.values())


def test_undamaged_file_loads_in_every_mode(saved):
    """The undamaged files load verified and unverified, read and mapped,
    with the same results (the reference the damaged cases compare with)."""
    paths, qpath, _ = saved
    Q = np.load(qpath)
    for path in paths.values():
        ref = ipq_index.load(path, mmap=False).search(Q, 10, num_threads=1)
        for mmap in (True, False):
            for verify in (True, False):
                got = ipq_index.load(path, mmap=mmap, verify=verify).search(Q, 10, num_threads=1)
                np.testing.assert_array_equal(got[1], ref[1])
                np.testing.assert_array_equal(got[0], ref[0])


#: bytes between two flipped bytes of the sweep (a prime: no alignment with the 64-byte array layout)
SWEEP_STRIDE = 211


@pytest.mark.slow
def test_every_byte_stride_sweep(saved, tmp_path):
    """A byte flipped every SWEEP_STRIDE bytes through each file, verified
    (both load modes) and unverified (mapped).  Part of the default run
    (about a minute on 2 cores); ``-m "not slow"`` leaves it out while
    developing, ``IPQ_SWEEP_STRIDE=53`` makes it denser."""
    stride = int(os.environ.get("IPQ_SWEEP_STRIDE", SWEEP_STRIDE))
    verified = _flip_cases(saved[0], (True, False), verify=True, per_array=0, stride=stride)
    unverified = _flip_cases(saved[0], (True,), verify=False, per_array=0, stride=stride)
    results = _run(verified + unverified, saved, tmp_path)
    print(f"sweep: {len(verified)} verified, {len(unverified)} unverified cases, {_tally(results)}")
    _judge(verified, results)
    _judge(unverified, results, strict=False)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_finiteness_scan_of_large_arrays(dtype):
    """The chunked bit-pattern scan (arrays above one chunk) finds a NaN or
    inf anywhere, the last chunk's last element included, and passes finite
    extremes."""
    from ipq_index import validation

    n = validation._CHUNK * 2 + 10
    a = np.zeros(n, dtype)
    a[:3] = (np.finfo(dtype).max, -np.finfo(dtype).max, np.finfo(dtype).tiny)
    assert validation._all_finite(a.reshape(-1, 2))
    for at in (0, validation._CHUNK, n - 1):
        for bad in (np.nan, np.inf, -np.inf):
            b = a.copy()
            b[at] = bad
            assert not validation._all_finite(b.reshape(-1, 2)), (at, bad)
    if dtype != np.float16:
        assert not validation._all_finite(a.reshape(-1, 2), validation.MAX_ABS)  # finfo.max
        b = np.zeros(n, dtype)
        b[-1] = -validation.MAX_ABS
        assert validation._all_finite(b, validation.MAX_ABS)
        b[-1] *= 1.01
        assert not validation._all_finite(b, validation.MAX_ABS)
