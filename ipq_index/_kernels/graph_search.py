"""Beam search over an HNSW-style graph, scoring nodes by ADC on codes.

Graph layout (as extracted from faiss HNSW): node i's neighbours at level l
are ``neighbors[offsets[i] + cum[l] : offsets[i] + cum[l + 1]]`` (-1 = empty
slot); ``levels[i]`` is the number of levels of node i.
"""

from __future__ import annotations

import numpy as np
from numba import prange

from .._numba import inline_kernel, parallel_kernel
from .adc import heap_offer, heap_to_sorted, row_score


@inline_kernel
def _max_heap_push(hv, hi, size, v, i):
    pos = size
    hv[pos] = v
    hi[pos] = i
    while pos > 0:
        parent = (pos - 1) >> 1
        if hv[parent] < hv[pos]:
            tv = hv[parent]
            hv[parent] = hv[pos]
            hv[pos] = tv
            ti = hi[parent]
            hi[parent] = hi[pos]
            hi[pos] = ti
            pos = parent
        else:
            break
    return size + 1


@inline_kernel
def _max_heap_pop(hv, hi, size):
    size -= 1
    hv[0] = hv[size]
    hi[0] = hi[size]
    pos = 0
    while True:
        left = 2 * pos + 1
        if left >= size:
            break
        big = left
        if left + 1 < size and hv[left + 1] > hv[left]:
            big = left + 1
        if hv[big] > hv[pos]:
            tv = hv[big]
            hv[big] = hv[pos]
            hv[pos] = tv
            ti = hi[big]
            hi[big] = hi[pos]
            hi[pos] = ti
            pos = big
        else:
            break
    return size


@parallel_kernel
def graph_search(tables, codes, scales, neighbors, offsets, cum, entry, max_level, ef, kk, cap):
    """Top-kk rows per query by ADC score: greedy descent through the upper
    levels, then a beam search of width ``ef`` (>= kk) on level 0.  ``cap``
    bounds the candidate heap (a push beyond it is dropped)."""
    nq = tables.shape[0]
    n = codes.shape[0]
    has_scale = scales.shape[0] > 0
    out_v = np.full((nq, kk), -np.inf, np.float32)
    out_i = np.full((nq, kk), -1, np.int64)
    for qi in prange(nq):
        T = tables[qi]
        visited = np.zeros(n, np.uint8)
        cur = entry
        cur_s = row_score(T, codes, scales, has_scale, cur)
        for lev in range(max_level, 0, -1):
            changed = True
            while changed:
                changed = False
                base = offsets[cur]
                for t in range(base + cum[lev], base + cum[lev + 1]):
                    nb = neighbors[t]
                    if nb < 0:
                        break
                    s = row_score(T, codes, scales, has_scale, nb)
                    if s > cur_s:
                        cur_s = s
                        cur = nb
                        changed = True
        cv = np.empty(cap, np.float32)
        ci = np.empty(cap, np.int64)
        rv = np.full(ef, -np.inf, np.float32)
        ri = np.full(ef, -1, np.int64)
        nres = 0
        csize = _max_heap_push(cv, ci, 0, cur_s, cur)
        visited[cur] = 1
        heap_offer(rv, ri, cur_s, cur)  # rv: min-heap over ef slots (-inf = empty)
        nres = 1
        while csize > 0:
            c_s = cv[0]
            c = ci[0]
            if nres >= ef and c_s < rv[0]:
                break
            csize = _max_heap_pop(cv, ci, csize)
            base = offsets[c]
            for t in range(base + cum[0], base + cum[1]):
                nb = neighbors[t]
                if nb < 0:
                    break
                if visited[nb]:
                    continue
                visited[nb] = 1
                s = row_score(T, codes, scales, has_scale, nb)
                if nres < ef or s > rv[0]:
                    if csize < cap:
                        csize = _max_heap_push(cv, ci, csize, s, nb)
                    heap_offer(rv, ri, s, nb)
                    if nres < ef:
                        nres += 1
        heap_to_sorted(rv, ri)
        for t in range(min(kk, ef)):
            out_v[qi, t] = rv[t]
            out_i[qi, t] = ri[t]
    return out_v, out_i
