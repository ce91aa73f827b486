"""Top-k results of the search kernels: a min-heap of the best scores
(offer, sort in place) and result rows mapped to ids."""

from __future__ import annotations

import numpy as np

from .._numba import kernel


@kernel
def swap_entries(vals, ids, a, b):
    """Swap entries a and b of a heap's parallel arrays (vals, ids)."""
    tv = vals[a]
    vals[a] = vals[b]
    vals[b] = tv
    ti = ids[a]
    ids[a] = ids[b]
    ids[b] = ti


@kernel
def _heap_sift_down(vals, ids, pos, k):
    """Restore the min-heap property of (vals, ids)[:k] below ``pos``."""
    while True:
        left = 2 * pos + 1
        if left >= k:
            return
        small = left
        right = left + 1
        if right < k and vals[right] < vals[left]:
            small = right
        if vals[small] < vals[pos]:
            swap_entries(vals, ids, pos, small)
            pos = small
        else:
            return


@kernel
def heap_offer(hv, hi, s, r):
    """Keep (s, r) in the min-heap (hv, hi) of the best scores if it beats the worst."""
    if s > hv[0]:
        hv[0] = s
        hi[0] = r
        _heap_sift_down(hv, hi, 0, hv.shape[0])


@kernel
def heap_to_sorted(vals, ids):
    """Sort a filled min-heap in place into descending order of vals."""
    k = vals.shape[0]
    for end in range(k - 1, 0, -1):
        swap_entries(vals, ids, 0, end)
        _heap_sift_down(vals, ids, 0, end)


@kernel
def ids_of_rows_one(out_v, out_r, out_ids, ids):
    """out_ids = ids[out_r] for one query's result row (-1 rows: id -1, score -inf)."""
    for t in range(out_r.shape[0]):
        r = out_r[t]
        if r >= 0:
            out_ids[t] = ids[r]
        else:
            out_v[t] = -np.inf


@kernel
def allowed(allow, r):
    """Whether a filter lets row r through (``allow[r]`` nonzero; None: every row)."""
    if allow is None:
        return True
    return allow[r] != 0
