"""Checks of a loaded index file's header and arrays before an index is
built from them (``persistence.load``): every array the structure reads must
have the dtype and shape the header implies and values the search kernels
can index with safely, so a damaged or crafted file raises
``storage.FormatError`` naming the array and the problem instead of
crashing a numba kernel (out-of-bounds reads), hanging or answering wrong.

The checksums (``storage.load_arrays``) catch random damage; these checks
catch files whose checksums are valid but whose contents are not what
``save`` writes (another writer, a bug, a crafted file).  They are
vectorised numpy passes: cheap next to the checksums (see
``docs/file_format.md`` for measured costs).
"""

from __future__ import annotations

import numpy as np

from .storage import FormatError

__all__ = ["validate_index", "KIND_ARRAYS"]

#: the arrays of each kind of index: name -> dtype (``np.dtype.str``) as ``save`` writes them
_COMMON = {"enc.mean": "<f8", "enc.energy": "<f8", "enc.bits": "<i4", "enc.byte_of": "<i4",
           "enc.shift_of": "<i4", "enc.levels": "<f8", "enc.level_off": "<i8", "codes": "|u1", "ids": "<i8"}
#: arrays present only in some indexes of a kind (rotation, per-vector scales, re-rank copy)
_OPTIONAL = {"enc.rotation": "<f4", "scales": "<f4", "vectors": None, "removed": "|u1"}
KIND_ARRAYS = {
    "flat": dict(_COMMON),
    "ivf": {**_COMMON, "ivf.centroids": "<f4", "ivf.assign": "<i4"},
    "hnsw": {**_COMMON, "graph.neighbors": "<i4", "graph.offsets": "<i8", "graph.cum": "<i8",
             "graph.entry": "<i8"},
}
_RERANK_DTYPES = {"float16": "<f2", "float32": "<f4"}
#: elements per chunk of the finiteness scan of large arrays (bounds its scratch memory)
_CHUNK = 1 << 22
#: bound on the magnitude of stored values (levels, mean, energy, centroids,
#: scales, float32 re-rank copy): the kernels sum products of them and the
#: queries in float32 (max 3.4e38), and an exponent bit flipped in a float64
#: level makes it ~1e300 while it stays sorted and finite
MAX_ABS = 1e15
#: tolerance of the rotation's orthogonality, max |R^T R - I| (float32 eigenvectors: ~1e-6)
_ORTHO_TOL = 1e-3


class _Checker:
    def __init__(self, path):
        self.prefix = f"{path}: " if path is not None else ""

    def fail(self, what, problem):
        raise FormatError(f"{self.prefix}index file is invalid: {what}: {problem}")


def _is_int(v) -> bool:
    return type(v) is int


# bit masks of the exponent field (all ones: inf or NaN) per float width
_EXP = {2: (np.uint16, 0x7FFF, 0x7C00), 4: (np.uint32, 0x7FFFFFFF, 0x7F800000),
        8: (np.uint64, 0x7FFFFFFFFFFFFFFF, 0x7FF0000000000000)}


def _all_finite(a, limit=None) -> bool:
    """Whether a float array holds no NaN or inf (and, with ``limit``, no
    value of magnitude above it): small arrays by numpy comparisons, large
    ones chunk by chunk on their bit patterns (the magnitude bits of IEEE
    floats order as the magnitudes: one integer AND and max per element, no
    float16 arithmetic)."""
    flat = a.reshape(-1)
    if flat.size <= _CHUNK:
        if limit is None:
            return bool(np.isfinite(flat).all())
        return bool((np.abs(flat) <= min(limit, float(np.finfo(a.dtype).max))).all())  # False for NaN
    utype, absmask, expmask = _EXP[a.dtype.itemsize]
    if limit is not None:
        with np.errstate(over="ignore"):
            top = np.array(limit, a.dtype).view(utype)  # inf when limit exceeds the dtype's range
        expmask = min(int(expmask), int(top) + 1)
    bits = flat.view(utype)
    buf = np.empty(_CHUNK, utype)
    for s in range(0, bits.size, _CHUNK):
        part = bits[s:s + _CHUNK]
        m = buf[:part.size]
        np.bitwise_and(part, utype(absmask), out=m)
        if m.max() >= expmask:
            return False
    return True


def _meta(c, meta, kinds):
    """The header fields ``_from_state`` reads: (kind, d, ntotal, encoder config)."""
    from .encoder import EncoderConfig

    if meta.get("library") != "ipq_index":
        c.fail("meta 'library'", f"{meta.get('library')!r} is not 'ipq_index'")
    kind = meta.get("kind")
    if not isinstance(kind, str) or kind not in kinds:
        c.fail("meta 'kind'", f"{kind!r} is not one of {sorted(kinds)}")
    for key in ("d", "ntotal", "rerank"):
        if key not in meta:
            c.fail(f"meta {key!r}", "missing")
        v = meta[key]
        lo = 1 if key == "d" else 0
        if not _is_int(v) or v < lo:
            c.fail(f"meta {key!r}", f"{v!r} is not an int >= {lo}")
    if meta.get("rerank_dtype") not in _RERANK_DTYPES:
        c.fail("meta 'rerank_dtype'", f"{meta.get('rerank_dtype')!r} is not one of {sorted(_RERANK_DTYPES)}")
    if not isinstance(meta.get("spec"), str):
        c.fail("meta 'spec'", f"{meta.get('spec')!r} is not a string")
    if "settings" in meta and not isinstance(meta["settings"], dict):
        c.fail("meta 'settings'", "not an object")
    if kind == "ivf" and (not _is_int(meta.get("nlist")) or meta["nlist"] < 1):
        c.fail("meta 'nlist'", f"{meta.get('nlist')!r} is not an int >= 1")
    if kind == "hnsw" and (not _is_int(meta.get("M")) or meta["M"] < 1):
        c.fail("meta 'M'", f"{meta.get('M')!r} is not an int >= 1")
    enc = meta.get("encoder")
    if not isinstance(enc, dict):
        c.fail("meta 'encoder'", "missing or not an object")
    for key in ("d", "config", "nbytes"):
        if key not in enc:
            c.fail(f"meta 'encoder.{key}'", "missing")
    if enc["d"] != meta["d"] or not _is_int(enc["d"]):
        c.fail("meta 'encoder.d'", f"{enc['d']!r} differs from d = {meta['d']}")
    if not _is_int(enc["nbytes"]) or enc["nbytes"] < 1:
        c.fail("meta 'encoder.nbytes'", f"{enc['nbytes']!r} is not an int >= 1")
    cfg = enc["config"]
    if not isinstance(cfg, dict):
        c.fail("meta 'encoder.config'", "not an object")
    try:
        config = EncoderConfig.from_dict(cfg)
    except (TypeError, ValueError) as e:
        c.fail("meta 'encoder.config'", str(e))
    # fields EncoderConfig leaves unchecked that the encoder branches on or converts
    if type(config.scale) is not bool:
        c.fail("meta 'encoder.config.scale'", f"{config.scale!r} is not a bool")
    if isinstance(config.bits, bool):
        c.fail("meta 'encoder.config.bits'", f"{config.bits!r} is not a number")
    for key in ("seed", "lloyd_iters"):
        v = getattr(config, key)
        if not _is_int(v) or v < 0:
            c.fail(f"meta 'encoder.config.{key}'", f"{v!r} is not an int >= 0")
    return kind, meta["d"], meta["ntotal"], config


def _names(c, arrays, kind, config, meta):
    """Every array the index reads is present with its dtype, and no other."""
    want = dict(KIND_ARRAYS[kind])
    if config.transform != "none":
        want["enc.rotation"] = _OPTIONAL["enc.rotation"]
    if config.scale:
        want["scales"] = _OPTIONAL["scales"]
    rr_dtype = _RERANK_DTYPES[meta["rerank_dtype"]]
    if meta["rerank"] > 0 or "vectors" in arrays:
        want["vectors"] = rr_dtype
    if "removed" in arrays:  # rows removed since the last compaction (tombstones)
        want["removed"] = _OPTIONAL["removed"]
    for name, dt in want.items():
        if name not in arrays:
            why = {"enc.rotation": f" (transform {config.transform!r})", "scales": " (scaled codes)",
                   "vectors": f" (rerank {meta['rerank']})"}.get(name, "")
            c.fail(f"array {name!r}", f"missing{why}")
        if arrays[name].dtype.str != dt:
            c.fail(f"array {name!r}", f"dtype {arrays[name].dtype.str} is not {dt}")
    extra = sorted(set(arrays) - set(want))
    if extra:
        c.fail(f"array {extra[0]!r}", f"not part of a {kind} index"
               + (f" with transform {config.transform!r}" if extra[0] == "enc.rotation" else "")
               + (" without per-vector scales" if extra[0] == "scales" else ""))


def _shape(c, arrays, name, shape):
    got = arrays[name].shape
    if got != tuple(shape):
        c.fail(f"array {name!r}", f"shape {got} is not {tuple(shape)}")


def _finite(c, arrays, name, limit=MAX_ABS):
    if not _all_finite(arrays[name], limit):
        c.fail(f"array {name!r}", "holds NaN or infinite values" if limit is None else
               f"holds NaN, infinite or huge (|x| > {limit:g}) values")


def _range(c, arrays, name, lo, hi, a=None):
    """Values of ``name`` (or of ``a``, a part of it) in [lo, hi)."""
    a = arrays[name] if a is None else a
    if a.size and (int(a.min()) < lo or int(a.max()) >= hi):
        bad = a[(a < lo) | (a >= hi)]
        c.fail(f"array {name!r}", f"value {int(bad[0])} out of range [{lo}, {hi})"
               f" ({bad.size} of {a.size} entries)")


def _encoder(c, arrays, d, nbytes, config):
    for name in ("enc.mean", "enc.energy", "enc.bits", "enc.byte_of", "enc.shift_of"):
        _shape(c, arrays, name, (d,))
    _shape(c, arrays, "enc.level_off", (d + 1,))
    if arrays["enc.levels"].ndim != 1:
        c.fail("array 'enc.levels'", f"shape {arrays['enc.levels'].shape} is not 1-D")
    bits = arrays["enc.bits"]
    _range(c, arrays, "enc.bits", 0, config.max_bits + 1)
    _range(c, arrays, "enc.byte_of", 0, nbytes)
    _range(c, arrays, "enc.shift_of", 0, 8)
    b64 = bits.astype(np.int64)
    shift = arrays["enc.shift_of"].astype(np.int64)
    byte = arrays["enc.byte_of"].astype(np.int64)
    over = np.nonzero(shift + b64 > 8)[0]
    if over.size:
        j = int(over[0])
        c.fail("arrays 'enc.bits', 'enc.shift_of'", f"dimension {j}: a {int(b64[j])}-bit field at bit "
               f"{int(shift[j])} runs past its byte")
    # the fields of a byte must not share bits (the codes were packed with this layout)
    coded = b64 > 0
    masks = ((np.int64(1) << b64[coded]) - 1) << shift[coded]
    used = np.zeros(nbytes, np.int64)
    np.bitwise_or.at(used, byte[coded], masks)
    if used.sum() != masks.sum():
        g = int(np.nonzero(np.bincount(byte[coded], weights=masks, minlength=nbytes) != used)[0][0])
        c.fail("arrays 'enc.byte_of', 'enc.shift_of', 'enc.bits'", f"fields of code byte {g} overlap")
    # level sets: 2^b levels per coded dimension, none for the others, laid end to end
    off = arrays["enc.level_off"]
    sizes = np.where(coded, np.int64(1) << b64, 0)
    if off[0] != 0 or np.any(np.diff(off) != sizes):
        j = 0 if off[0] != 0 else int(np.nonzero(np.diff(off) != sizes)[0][0])
        c.fail("arrays 'enc.level_off', 'enc.bits'", f"dimension {j}: offsets {int(off[j])}..{int(off[j + 1])} do not "
               f"hold the 2^{int(b64[j])} levels of its {int(b64[j])}-bit field")
    levels = arrays["enc.levels"]
    if levels.shape[0] != off[-1]:
        c.fail("arrays 'enc.levels', 'enc.level_off'", f"{levels.shape[0]} levels, the offsets need {int(off[-1])}")
    _finite(c, arrays, "enc.levels")
    # sorted within each dimension (the encoder's binary search, the tables' end levels)
    step = np.diff(levels) >= 0
    inner = off[1:-1]
    step[inner[(inner > 0) & (inner < levels.size)] - 1] = True  # pairs across two dimensions
    if not step.all():
        i = int(np.argmin(step))
        j = int(np.searchsorted(off, i, side="right") - 1)
        c.fail("array 'enc.levels'", f"levels of dimension {j} are not sorted")
    _finite(c, arrays, "enc.mean")
    _finite(c, arrays, "enc.energy")
    if arrays["enc.energy"].min(initial=0.0) < 0:
        c.fail("array 'enc.energy'", "holds negative query energies")
    if "enc.rotation" in arrays:
        _shape(c, arrays, "enc.rotation", (d, d))
        _finite(c, arrays, "enc.rotation", None)
        R = np.asarray(arrays["enc.rotation"], np.float64)
        dev = np.abs(R.T @ R - np.eye(d)).max()
        if dev > _ORTHO_TOL:
            c.fail("array 'enc.rotation'", f"not orthogonal (max |R^T R - I| = {dev:.3g})")


def _rows(c, arrays, d, n, nbytes, meta):
    _shape(c, arrays, "codes", (n, nbytes))
    _shape(c, arrays, "ids", (n,))
    if n and int(arrays["ids"].min()) < 0:
        c.fail("array 'ids'", f"negative id {int(arrays['ids'].min())} (-1 marks an empty result slot)")
    if "scales" in arrays:
        _shape(c, arrays, "scales", (n,))
        _finite(c, arrays, "scales")
    if "vectors" in arrays:
        _shape(c, arrays, "vectors", (n, d))
        _finite(c, arrays, "vectors")
    if "removed" in arrays:
        _shape(c, arrays, "removed", (n,))
        _range(c, arrays, "removed", 0, 2)


def _ivf(c, arrays, d, n, meta):
    nlist = meta["nlist"]
    _shape(c, arrays, "ivf.centroids", (nlist, d))
    _finite(c, arrays, "ivf.centroids")
    _shape(c, arrays, "ivf.assign", (n,))
    _range(c, arrays, "ivf.assign", 0, nlist)


def _graph(c, arrays, n):
    """Every read of the walk stays inside the arrays: node i's slots
    neighbors[offsets[i] + cum[l] : offsets[i] + cum[l + 1]] exist for each
    of its levels l < L_i (offsets[i + 1] - offsets[i] = cum[L_i], L_i >= 1),
    neighbours are -1 or rows, a neighbour at level l >= 1 has a level l
    itself (the greedy descent reads its list there), and the entry point
    sits on the top level."""
    nb, off, cum, entry = (arrays[f"graph.{k}"] for k in ("neighbors", "offsets", "cum", "entry"))
    _shape(c, arrays, "graph.offsets", (n + 1,))
    _shape(c, arrays, "graph.entry", (2,))
    if nb.ndim != 1:
        c.fail("array 'graph.neighbors'", f"shape {nb.shape} is not 1-D")
    if cum.ndim != 1 or cum.shape[0] < 2:
        c.fail("array 'graph.cum'", f"shape {cum.shape}: needs at least 2 entries (level 0)")
    width = np.diff(cum)
    # the walk sizes its scratch by the widest level: level 0 (2M slots, M above in faiss)
    if cum[0] != 0 or width.min() < 1 or width.max() > width[0]:
        c.fail("array 'graph.cum'", f"neighbour counts per level {width.tolist()} must start at 0, "
               "be positive and at most level 0's")
    if off[0] != 0 or off[-1] != nb.shape[0]:
        c.fail("arrays 'graph.offsets', 'graph.neighbors'", f"must run from 0 to the neighbour count {nb.shape[0]}, "
               f"runs from {int(off[0])} to {int(off[-1])}")
    span = np.diff(off)
    if span.size and span.min() < 0:
        c.fail("array 'graph.offsets'", f"not monotone (node {int(np.argmin(span))})")
    nlev = np.searchsorted(cum, span)  # L_i where cum[L_i] == span_i
    bad = (nlev < 1) | (nlev >= cum.shape[0])
    bad[~bad] = cum[nlev[~bad]] != span[~bad]
    if bad.any():
        i = int(np.argmax(bad))
        c.fail("arrays 'graph.offsets', 'graph.cum'", f"node {i} holds {int(span[i])} neighbour slots, not a level "
               f"total of graph.cum {cum.tolist()}")
    _range(c, arrays, "graph.neighbors", -1, n)
    if n == 0:
        return
    ep, top = int(entry[0]), int(entry[1])
    if not 0 <= ep < n:
        c.fail("array 'graph.entry'", f"entry point {ep} out of range [0, {n})")
    if top != int(nlev.max()) - 1 or nlev[ep] != top + 1:
        c.fail("arrays 'graph.entry', 'graph.offsets'", f"max level {top} is not the entry point's level {int(nlev[ep]) - 1} "
               f"and the graph's top level {int(nlev.max()) - 1}")
    # slots on levels >= 1 (the few nodes above level 0)
    up = np.nonzero(nlev > 1)[0]
    if up.size:
        first = off[up] + cum[1]
        count = off[up + 1] - first
        total = int(count.sum())
        node = np.repeat(up, count)
        slot = np.arange(total, dtype=np.int64) + np.repeat(first - (np.cumsum(count) - count), count)
        lev = np.searchsorted(cum, slot - off[node], side="right") - 1
        to = nb[slot].astype(np.int64)
        wrong = (to >= 0) & (nlev[np.maximum(to, 0)] <= lev)
        if wrong.any():
            t = int(np.argmax(wrong))
            c.fail("array 'graph.neighbors'", f"node {int(node[t])} links at level {int(lev[t])} to node "
                   f"{int(to[t])}, which has no level {int(lev[t])}")


def validate_index(meta: dict, arrays: dict, path=None) -> None:
    """Raise ``FormatError`` (naming the field or array and the problem)
    unless the header ``meta`` and ``arrays`` (as ``storage.load_arrays``
    returns them) form an index that ``save`` could have written: meta
    fields of the right types; each array present with its dtype and shape;
    encoder layout consistent (field widths, bytes, shifts, level offsets,
    sorted finite levels, orthogonal rotation); ids non-negative; float
    arrays finite; IVF assignments in range; graph offsets, levels,
    neighbours and entry point consistent."""
    from .structures import KINDS

    c = _Checker(path)
    if not isinstance(meta, dict):
        c.fail("meta", "not an object")
    kind, d, n, config = _meta(c, meta, KINDS)
    _names(c, arrays, kind, config, meta)
    nbytes = meta["encoder"]["nbytes"]
    _encoder(c, arrays, d, nbytes, config)
    _rows(c, arrays, d, n, nbytes, meta)
    if kind == "ivf":
        _ivf(c, arrays, d, n, meta)
    elif kind == "hnsw":
        _graph(c, arrays, n)
