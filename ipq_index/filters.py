"""Search filters: which ids a search may return (the FAISS ``IDSelector``
idea as plain values).

``index.search(Q, k, filter=...)`` takes

- an integer array (or ``AllowIds``): the ids allowed;
- a boolean array (or ``IdMask``): ``mask[id]`` allows the id (ids beyond
  the mask are not allowed);
- ``DenyIds(ids)``: every id except these.

The filter is applied inside the scan and walk kernels (the graph walks
through filtered-out rows but never returns them), so a search returns
exactly k results whenever at least k live rows pass it.

Turning a filter into the rows it allows costs O(rows) (tens of ms at 10^6
rows).  A filter object (``AllowIds``, ``DenyIds``, ``IdMask``) keeps that
work, and the search it prepared, for the index it last served until the
index changes: build the object once and pass it to every search that uses
the same filter.  A plain array is converted on every call.
"""

from __future__ import annotations

import numpy as np

__all__ = ["AllowIds", "DenyIds", "IdMask", "as_filter"]


class _IdFilter:
    """A filter: ``rows(ids)`` says which rows pass.  ``_memo`` holds the
    rows it allows in the index it last served (``IndexBase._allowed``);
    a filter's ids are copied when it is made and never change."""

    _memo = None

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """Boolean (n,): which of the rows with these ``ids`` pass."""
        raise NotImplementedError


def _id_array(ids, what):
    a = np.asarray(ids)
    if a.ndim > 1 or not (a.size == 0 or np.issubdtype(a.dtype, np.integer)):
        raise ValueError(f"{what} must be a 1-D array of integer ids, got shape {a.shape} dtype {a.dtype}")
    return a.reshape(-1).astype(np.int64)


class AllowIds(_IdFilter):
    """Only these ids."""

    def __init__(self, ids):
        self.ids = np.unique(_id_array(ids, "allowed ids"))

    def rows(self, ids):
        return np.isin(ids, self.ids, assume_unique=False)


class DenyIds(_IdFilter):
    """Every id except these."""

    def __init__(self, ids):
        self.ids = np.unique(_id_array(ids, "denied ids"))

    def rows(self, ids):
        return ~np.isin(ids, self.ids)


class IdMask(_IdFilter):
    """``mask[id]`` allows the id; ids at or beyond ``len(mask)`` are not allowed."""

    def __init__(self, mask):
        m = np.asarray(mask)
        if m.ndim != 1 or m.dtype != np.bool_:
            raise ValueError(f"an id mask must be a 1-D boolean array, got shape {m.shape} dtype {m.dtype}")
        self.mask = np.array(m)  # a copy: the caller may change theirs

    def rows(self, ids):
        inside = ids < self.mask.shape[0]
        out = np.zeros(ids.shape[0], bool)
        out[inside] = self.mask[ids[inside]]
        return out


def as_filter(value) -> _IdFilter:
    """The filter a search's ``filter=`` argument means (see the module doc)."""
    if isinstance(value, _IdFilter):
        return value
    a = np.asarray(value)
    if a.dtype == np.bool_:
        return IdMask(a)
    if a.size == 0 or np.issubdtype(a.dtype, np.integer):
        return AllowIds(a)
    raise ValueError(f"filter must be an array of allowed ids, a boolean id mask or a DenyIds, got dtype {a.dtype}")

