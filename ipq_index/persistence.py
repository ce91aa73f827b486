"""Loading saved indexes: the file header's ``kind`` picks the class
(``structures.KINDS``), which rebuilds itself from the header and arrays
once ``validation.validate_index`` has checked them (so no search kernel
ever reads an array a damaged or crafted file made inconsistent)."""

from __future__ import annotations

from . import storage
from .structures import KINDS, FlatIndex
from .validation import validate_index

__all__ = ["load"]


def load(path, mmap: bool = True, verify: bool = True) -> FlatIndex:
    """Load an index saved by ``save``.

    ``mmap=True`` maps the arrays read-only instead of reading them into
    memory.  ``verify=True`` checks every array's CRC32, memory-mapped ones
    included (it reads the file once: ~50 ms per 100 MB from the page cache);
    ``verify=False`` skips that for trusted files (a memory-mapped open then
    reads little more than the header).  Either way the header and the
    arrays' dtypes, shapes and values are validated.  A damaged, truncated,
    foreign or inconsistent file raises ``FormatError`` naming what is wrong.
    """
    meta, arrays = storage.load_arrays(path, mmap=mmap, verify=verify)
    validate_index(meta, arrays, path)
    try:
        return KINDS[meta["kind"]]._from_state(meta, arrays)
    except storage.FormatError:
        raise
    except (KeyError, TypeError, ValueError, IndexError) as e:
        # a header field validate_index does not cover; the original stays attached as the cause
        raise storage.FormatError(f"{path}: index file is invalid: {type(e).__name__}: {e}") from e
