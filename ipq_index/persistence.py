"""Loading saved indexes: the file header's ``kind`` picks the class
(``structures.KINDS``), which rebuilds itself from the header and arrays."""

from __future__ import annotations

from . import storage
from .structures import KINDS, FlatIndex

__all__ = ["load"]


def load(path, mmap: bool = True) -> FlatIndex:
    """Load an index saved by ``save``; ``mmap=True`` maps the large arrays read-only."""
    meta, arrays = storage.load_arrays(path, mmap=mmap)
    if meta.get("library") != "ipq_index" or meta.get("kind") not in KINDS:
        raise storage.FormatError(f"{path} does not hold an ipq_index index")
    return KINDS[meta["kind"]]._from_state(meta, arrays)
