"""The manifest of a saved sharded index, and the few file operations the
client needs on a local directory or an fsspec URL.

A saved sharded index is a directory::

    manifest.json                 written last, atomically (temp + rename)
    encoder-<gen>.ipq             the trained encoder, no vectors
    shard-00000-<gen>.ipq ...     one single-node ipq file per shard

``<gen>`` is a fresh token per ``save``: a new save never overwrites the
files the current manifest names, so the directory always holds either the
old complete index or the new one (old generations are removed once the
new manifest is in place).  The manifest's ``sha256`` covers its ``index``
record (canonical JSON); each file entry carries the file's size and header
CRC32 (the header lists every array's CRC32), so a replaced or damaged shard
file is detected before it is mapped.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import re
import tempfile

from ..storage import FormatError

MANIFEST = "manifest.json"
FORMAT = "ipq_index.sharded"
VERSION = 1
#: the files a save writes (and may remove when a later save replaces them)
_OWN_FILE = re.compile(r"^(shard-\d{5}|encoder)-[0-9a-f]{12}\.ipq$")


def is_url(path) -> bool:
    return "://" in str(path) and not str(path).startswith("file://")


def local_path(path) -> str:
    s = os.fspath(path) if not isinstance(path, str) else path
    return s[len("file://"):] if s.startswith("file://") else s


def join(base, name) -> str:
    return posixpath.join(base.rstrip("/"), name) if is_url(base) else os.path.join(base, name)


def _fs(url):
    try:
        import fsspec
    except ImportError:
        raise ImportError(f"{url}: saving to or loading from a URL needs fsspec (pip install fsspec)") from None
    return fsspec.core.url_to_fs(url)


def make_dir(base) -> None:
    if is_url(base):
        fs, p = _fs(base)
        fs.makedirs(p, exist_ok=True)
    else:
        if os.path.exists(base) and not os.path.isdir(base):
            raise NotADirectoryError(f"{base}: a sharded index is saved to a directory; this is a file")
        os.makedirs(base, exist_ok=True)


def list_dir(base) -> list[str]:
    if is_url(base):
        fs, p = _fs(base)
        return [posixpath.basename(x.rstrip("/")) for x in fs.ls(p, detail=False)]
    return os.listdir(base)


def remove(path) -> None:
    """Remove a file; a missing file is fine (best effort: cleanup never hides the real error)."""
    try:
        if is_url(path):
            fs, p = _fs(path)
            fs.rm(p)
        else:
            os.unlink(path)
    except (OSError, FileNotFoundError):
        pass


def remove_stale(base, keep: set[str]) -> None:
    """Remove the files of earlier saves (names this module writes, not in ``keep``)."""
    try:
        names = list_dir(base)
    except OSError:
        return
    for name in names:
        if _OWN_FILE.match(name) and name not in keep:
            remove(join(base, name))


def digest(record: dict) -> str:
    return hashlib.sha256(json.dumps(record, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def write(base, record: dict) -> None:
    """Write the manifest of ``record`` atomically: a temporary sibling, flushed, then renamed."""
    text = json.dumps({"format": FORMAT, "version": VERSION, "sha256": digest(record), "index": record},
                      indent=1, sort_keys=True).encode()
    target = join(base, MANIFEST)
    if is_url(base):
        fs, p = _fs(target)
        fs.pipe_file(p + ".part", text)
        fs.mv(p + ".part", p)
        return
    fd, tmp = tempfile.mkstemp(dir=base, prefix=".manifest-", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, target)
    except BaseException:
        remove(tmp)
        raise
    try:  # make the rename itself durable
        dfd = os.open(base, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def read(base) -> dict:
    """The ``index`` record of a manifest, after checking format, version and checksum."""
    target = join(base, MANIFEST)
    try:
        if is_url(base):
            fs, p = _fs(target)
            text = fs.cat_file(p)
        else:
            with open(target, "rb") as f:
                text = f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"{base}: no sharded index here (no {MANIFEST})") from None
    try:
        doc = json.loads(text)
    except (ValueError, UnicodeDecodeError) as e:
        raise FormatError(f"{target}: manifest is not valid JSON ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise FormatError(f"{target}: not an ipq_index sharded-index manifest")
    if doc.get("version") != VERSION:
        raise FormatError(f"{target}: manifest version {doc.get('version')!r} is not supported (this is {VERSION})")
    record = doc.get("index")
    if not isinstance(record, dict) or digest(record) != doc.get("sha256"):
        raise FormatError(f"{target}: manifest checksum does not match its contents (damaged or edited)")
    for key in ("d", "spec", "n_shards", "ntotal", "next_id", "encoder", "shards"):
        if key not in record:
            raise FormatError(f"{target}: manifest lacks {key!r}")
    if len(record["shards"]) != record["n_shards"]:
        raise FormatError(f"{target}: manifest lists {len(record['shards'])} shards, n_shards is {record['n_shards']}")
    return record
