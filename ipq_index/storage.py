"""Versioned single-file container: header + 64-byte-aligned arrays, memory-mappable.

Layout::

    0    8 bytes   magic  b"IPQINDEX"
    8    4 bytes   format version (uint32 little endian)
    12   4 bytes   CRC32 of the JSON header bytes
    16   8 bytes   JSON header length H (uint64)
    24   H bytes   JSON header (utf-8): {"meta": {...}, "arrays": {name: {dtype,
                   shape, offset, nbytes, crc32}}}
    ...            arrays, each starting at a multiple of 64 bytes

Files are written to a temporary sibling and renamed into place, so a failed
save never leaves a partial file behind.  ``load`` checks magic, version,
header checksum, array bounds and (unless memory-mapped) array checksums.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
import zlib
from pathlib import Path

import numpy as np

MAGIC = b"IPQINDEX"
FORMAT_VERSION = 1
ALIGN = 64
_PREFIX = struct.Struct("<8sIIQ")


class FormatError(ValueError):
    """The file is not a valid ipq_index file (foreign, corrupt, truncated or too new)."""


def _crc(buf) -> int:
    return zlib.crc32(memoryview(buf).cast("B")) & 0xFFFFFFFF


def save_arrays(path, meta: dict, arrays: dict[str, np.ndarray]) -> None:
    path = Path(path)
    entries = {}
    offset = 0
    prepared = {}
    for name, arr in arrays.items():
        a = np.ascontiguousarray(arr)
        if a.dtype.kind not in "biuf" or a.dtype.byteorder == ">":
            raise TypeError(f"array {name!r}: unsupported dtype {a.dtype}")
        prepared[name] = a
        entries[name] = {"dtype": a.dtype.str, "shape": list(a.shape), "rel": offset,
                         "nbytes": int(a.nbytes), "crc32": _crc(a)}
        offset += -(-a.nbytes // ALIGN) * ALIGN
    # the header size depends on the offsets; fix the data start generously
    header = json.dumps({"meta": meta, "arrays": entries}, sort_keys=True).encode()
    data_start = -(-(_PREFIX.size + len(header) + 64 * len(entries) + 256) // ALIGN) * ALIGN
    for e in entries.values():
        e["offset"] = data_start + e.pop("rel")
    header = json.dumps({"meta": meta, "arrays": entries}, sort_keys=True).encode()
    assert _PREFIX.size + len(header) <= data_start
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent or ".")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(_PREFIX.pack(MAGIC, FORMAT_VERSION, _crc(header), len(header)))
            f.write(header)
            for name, a in prepared.items():
                f.seek(entries[name]["offset"])
                f.write(memoryview(a).cast("B"))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_header(path) -> tuple[dict, dict, int]:
    """(meta, array entries, file size) after validating the prefix and header."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no index file at {path}")
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(_PREFIX.size)
        if len(prefix) < _PREFIX.size or prefix[:8] != MAGIC:
            raise FormatError(f"{path} is not an ipq_index file (bad magic)")
        _, version, hcrc, hlen = _PREFIX.unpack(prefix)
        if version > FORMAT_VERSION:
            raise FormatError(f"{path} uses format version {version}; this ipq_index reads "
                              f"versions <= {FORMAT_VERSION}: upgrade ipq_index")
        if version < 1:
            raise FormatError(f"{path}: invalid format version {version}")
        if _PREFIX.size + hlen > size:
            raise FormatError(f"{path} is truncated (header runs past the end of the file)")
        header = f.read(hlen)
    if _crc(header) != hcrc:
        raise FormatError(f"{path} is corrupt (header checksum mismatch)")
    try:
        doc = json.loads(header)
        meta, entries = doc["meta"], doc["arrays"]
    except (ValueError, KeyError) as e:
        raise FormatError(f"{path} is corrupt (unreadable header: {e})") from None
    for name, e in entries.items():
        if e["offset"] + e["nbytes"] > size:
            raise FormatError(f"{path} is truncated (array {name!r} runs past the end of the file)")
    return meta, entries, size


def load_arrays(path, mmap: bool = True, verify: bool | None = None):
    """(meta, {name: array}).  Memory-mapped arrays are read-only views."""
    meta, entries, _ = read_header(path)
    verify = (not mmap) if verify is None else verify
    arrays = {}
    for name, e in entries.items():
        dtype = np.dtype(e["dtype"])
        shape = tuple(e["shape"])
        count = int(np.prod(shape)) if shape else 1
        if mmap and e["nbytes"] > 0:
            # a plain ndarray view (its base keeps the mapping open): kernels
            # and indexing skip the np.memmap subclass machinery (measured
            # ~15 us per single-query graph search)
            a = np.memmap(path, dtype=dtype, mode="r", offset=e["offset"], shape=shape).view(np.ndarray)
        else:
            with open(path, "rb") as f:
                f.seek(e["offset"])
                buf = f.read(e["nbytes"])
            if len(buf) != e["nbytes"]:
                raise FormatError(f"{path} is truncated (array {name!r})")
            a = np.frombuffer(buf, dtype=dtype, count=count).reshape(shape).copy()
            a.flags.writeable = False  # as the memory-mapped arrays
        if verify and _crc(np.ascontiguousarray(a)) != e["crc32"]:
            raise FormatError(f"{path} is corrupt (checksum mismatch in array {name!r})")
        arrays[name] = a
    return meta, arrays
