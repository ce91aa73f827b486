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
header checksum and every array entry (dtype, shape, size, alignment,
bounds, no overlap) and, unless ``verify=False``, every array's CRC32 (also
when memory-mapped).  ``docs/file_format.md`` describes the format and what
``ipq_index.load`` checks.
"""

from __future__ import annotations

import errno
import json
import os
import stat
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
    if isinstance(buf, np.ndarray):  # flat, so empty arrays of any shape checksum as b"" (0)
        buf = buf.reshape(-1)
    return zlib.crc32(memoryview(buf).cast("B")) & 0xFFFFFFFF


def save_arrays(path, meta: dict, arrays: dict[str, np.ndarray]) -> None:
    """Write ``meta`` and ``arrays`` to ``path`` (layout: module docstring).

    The file gets the permission bits of an ordinary new file (0o666 minus
    the umask), or keeps those of the file it replaces.  Errors name ``path``:
    ``ValueError`` for an empty path, ``IsADirectoryError`` for a directory,
    ``FileNotFoundError`` when its directory does not exist.
    """
    path = _target(path)
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
    fd, tmp = _temp_file(path)
    try:
        with os.fdopen(fd, "wb") as f:
            fd = None  # closed by f from here on
            _chmod(f.fileno(), tmp, new_file_mode(path))
            f.write(_PREFIX.pack(MAGIC, FORMAT_VERSION, _crc(header), len(header)))
            f.write(header)
            for name, a in prepared.items():
                f.seek(entries[name]["offset"])
                f.write(memoryview(a.reshape(-1)).cast("B"))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        _discard(fd, tmp, e)
        raise


def _target(path) -> Path:
    """``path`` as a Path after the checks that need the caller's spelling:
    not empty, not a directory."""
    if isinstance(path, str) and not path.strip():
        raise ValueError(f"cannot save to an empty path ({path!r}): give a file name")
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, f"cannot save to {str(path)!r}: it is a directory", str(path))
    return path


def _temp_file(path: Path) -> tuple[int, str]:
    """mkstemp next to ``path``; errors name the user's path and its directory,
    not the temporary name."""
    parent = path.parent
    if not parent.is_dir():
        problem = "no such directory" if not parent.exists() else "not a directory"
        cls = FileNotFoundError if not parent.exists() else NotADirectoryError
        code = errno.ENOENT if not parent.exists() else errno.ENOTDIR
        raise cls(code, f"cannot save {str(path)!r}: {problem}", str(parent))
    try:
        return tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=parent)
    except OSError as e:
        raise type(e)(e.errno, f"cannot save {str(path)!r}: {e.strerror}", str(parent)) from None


def new_file_mode(path) -> int:
    """The permission bits ``path`` would have after an ordinary write: those of
    the file it replaces, else 0o666 minus the umask (mkstemp creates 0o600)."""
    try:
        st = os.stat(path)
    except OSError:
        st = None
    if st is not None and stat.S_ISREG(st.st_mode):
        return stat.S_IMODE(st.st_mode)
    return 0o666 & ~_umask()


def _umask() -> int:
    """The process umask.  Linux reports it in /proc (read-only); elsewhere
    os.umask must set it to read it, and it is set back at once."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _chmod(fd: int, name: str, mode: int) -> None:
    if hasattr(os, "fchmod"):
        os.fchmod(fd, mode)
    else:  # Windows: no fchmod; only the read-only bit matters there
        os.chmod(name, mode)


def _discard(fd, tmp: str, error: BaseException) -> None:
    """Close ``fd`` (unless None) and delete the temporary file of a failed save.
    A failure here must not replace ``error``, the reason the save failed: it
    is attached to ``error`` as a note instead."""
    if fd is not None:
        try:
            os.close(fd)
        except OSError:
            pass
    try:
        os.unlink(tmp)
    except FileNotFoundError:
        pass
    except OSError as cleanup:
        if hasattr(error, "add_note"):
            error.add_note(f"the temporary file {tmp} could not be removed: {cleanup}")


#: the keys of an array entry in the header
ENTRY_KEYS = frozenset({"dtype", "shape", "offset", "nbytes", "crc32"})


def _int(v) -> bool:
    """Whether a header value is a JSON integer (not a bool, not a float)."""
    return type(v) is int


def _check_entry(path, name, e, data_start: int, size: int) -> None:
    """Raise FormatError unless array entry ``e`` is well-formed and lies
    inside the file, after the header, 64-byte aligned."""
    where = f"{path}: array {name!r}"
    if not isinstance(e, dict):
        raise FormatError(f"{where}: entry is not an object")
    if set(e) != ENTRY_KEYS:
        missing, extra = sorted(ENTRY_KEYS - set(e)), sorted(set(e) - ENTRY_KEYS)
        raise FormatError(f"{where}: entry keys are wrong (missing {missing}, unexpected {extra})")
    dt = e["dtype"]
    try:
        dtype = np.dtype(dt) if isinstance(dt, str) else None
    except (TypeError, ValueError):
        dtype = None
    # what save_arrays writes: a plain little-endian (or one-byte) numeric dtype string
    if dtype is None or dtype.kind not in "biuf" or dtype.str != dt or dtype.byteorder == ">":
        raise FormatError(f"{where}: dtype {dt!r} is not a little-endian numeric dtype")
    shape = e["shape"]
    if not isinstance(shape, list) or not all(_int(s) and s >= 0 for s in shape):
        raise FormatError(f"{where}: shape {shape!r} is not a list of non-negative ints")
    for key in ("offset", "nbytes", "crc32"):
        if not _int(e[key]) or e[key] < 0:
            raise FormatError(f"{where}: {key} {e[key]!r} is not a non-negative int")
    if e["crc32"] > 0xFFFFFFFF:
        raise FormatError(f"{where}: crc32 {e['crc32']} exceeds 32 bits")
    count = 1
    for s in shape:
        count *= s
    if e["nbytes"] != count * dtype.itemsize:
        raise FormatError(f"{where}: nbytes {e['nbytes']} != {count} elements x {dtype.itemsize} bytes "
                          f"(shape {shape}, dtype {dt})")
    if e["offset"] < data_start or e["offset"] % ALIGN:
        raise FormatError(f"{where}: offset {e['offset']} is not a multiple of {ALIGN} at or after "
                          f"the end of the header ({data_start})")
    if e["offset"] + e["nbytes"] > size:
        raise FormatError(f"{path} is truncated (array {name!r} runs past the end of the file)")


def read_header(path) -> tuple[dict, dict, int]:
    """(meta, array entries, file size) after validating the prefix and the
    header: every entry well-formed (``_check_entry``), inside the file and
    not overlapping another; raises FormatError otherwise."""
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
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise FormatError(f"{path} is corrupt (unreadable header: {e})") from None
    if not isinstance(doc, dict) or set(doc) != {"meta", "arrays"}:
        raise FormatError(f"{path} is corrupt (the header must hold exactly 'meta' and 'arrays')")
    meta, entries = doc["meta"], doc["arrays"]
    if not isinstance(meta, dict):
        raise FormatError(f"{path} is corrupt (header 'meta' is not an object)")
    if not isinstance(entries, dict):
        raise FormatError(f"{path} is corrupt (header 'arrays' is not an object)")
    data_start = _PREFIX.size + hlen
    for name, e in entries.items():
        _check_entry(path, name, e, data_start, size)
    spans = sorted((e["offset"], e["offset"] + e["nbytes"], name) for name, e in entries.items() if e["nbytes"])
    for (_, end, a), (start, _, b) in zip(spans, spans[1:]):
        if start < end:
            raise FormatError(f"{path} is corrupt (arrays {a!r} and {b!r} overlap)")
    return meta, entries, size


def load_arrays(path, mmap: bool = True, verify: bool = True):
    """(meta, {name: array}).  Memory-mapped arrays are read-only views,
    as are the arrays read into memory.  ``verify``: check every array's
    CRC32 (memory-mapped arrays too: it reads the mapped pages once, ~50 ms
    per 100 MB from the page cache); ``verify=False`` skips it (trusted
    files: a memory-mapped open then reads only the header)."""
    meta, entries, _ = read_header(path)
    arrays = {}
    for name, e in entries.items():
        dtype = np.dtype(e["dtype"])
        shape = tuple(e["shape"])
        count = int(np.prod(shape, dtype=np.int64)) if shape else 1
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
        if verify and _crc(a) != e["crc32"]:
            raise FormatError(f"{path} is corrupt (checksum mismatch in array {name!r})")
        arrays[name] = a
    return meta, arrays
