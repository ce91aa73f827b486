"""Beam search over an HNSW-style graph, scoring nodes by ADC on codes.

Graph layout (as extracted from faiss HNSW): node i's neighbours at level l
are ``neighbors[offsets[i] + cum[l] : offsets[i] + cum[l + 1]]`` (-1 = empty
slot); ``levels[i]`` is the number of levels of node i.
"""

from __future__ import annotations

import numpy as np

from .._numba import kernel, prefetch, prefetch1
from .coarse_tables import nav_table_one
from .rerank import PLAN_FIELDS, PLAN_TABLES, add_mean_one, rerank_rows, rescore_rerank_one, search_outputs
from .rotation import rotate_query
from .tables import _build_table, row_score, rows4_sums, scale4
from .topk import allowed, heap_offer, heap_to_sorted, ids_of_rows_one, swap_entries


@kernel
def _max_heap_push(hv, hi, size, v, i):
    pos = size
    hv[pos] = v
    hi[pos] = i
    while pos > 0:
        parent = (pos - 1) >> 1
        if hv[parent] < hv[pos]:
            swap_entries(hv, hi, parent, pos)
            pos = parent
        else:
            break
    return size + 1


@kernel
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
            swap_entries(hv, hi, big, pos)
            pos = big
        else:
            break
    return size


@kernel
def _score4(T, codes, scales, has_scale, rows, u, nn, sc4):
    """sc4[w] = score of row rows[u + w] for w < min(4, nn - u) (the last row
    repeats to fill the four interleaved sums)."""
    r0, r1, r2, r3 = rows[u], rows[min(u + 1, nn - 1)], rows[min(u + 2, nn - 1)], rows[min(u + 3, nn - 1)]
    s0, s1, s2, s3 = rows4_sums(T, codes, r0, r1, r2, r3)
    sc4[0], sc4[1], sc4[2], sc4[3] = scale4(s0, s1, s2, s3, r0, r1, r2, r3, scales, has_scale)


@kernel
def _beam_one(T, codes, scales, neighbors, offsets, cum, entry, max_level, ef, cap, visited, tag, allow,
              out_v, out_i):
    """One query: greedy descent through the upper levels, then a beam of
    width ``ef`` on level 0; ``visited[r] == tag`` marks scored rows; the best
    min(kk, ef) rows that ``allow`` lets through (a filter, nonzero = allowed;
    None: all) go to out_v/out_i (descending): filtered-out rows are still
    walked through, and the beam runs until it holds ef allowed rows.  T:
    float tables (ADC
    scores) or integer tables (exact integer sums, e.g. the int16 navigation
    tables).

    One function on purpose: the descent and the beam share the scratch
    rows, the heaps and the prefetch schedule, and the level-0 loop is the
    walk's whole cost (its steps interleave: the next node's list loads
    while this node's neighbours are scored)."""
    has_scale = scales.shape[0] > 0
    last = codes.shape[1] - 1
    width = 0
    for lev in range(cum.shape[0] - 1):
        width = max(width, cum[lev + 1] - cum[lev])
    fresh = np.empty(width, np.int64)
    sc4 = np.empty(4, np.float32)
    cur = entry
    cur_s = row_score(T, codes, scales, has_scale, cur)
    for lev in range(max_level, 0, -1):
        changed = True
        while changed:  # move to the best neighbour while it beats the current node
            changed = False
            base = offsets[cur]
            nn = 0
            for t in range(base + cum[lev], base + cum[lev + 1]):
                nb = neighbors[t]
                if nb < 0:
                    break
                fresh[nn] = nb
                nn += 1
                prefetch(codes, nb, 0)
                prefetch(codes, nb, last)
            best = cur
            best_s = cur_s
            for u in range(0, nn, 4):  # four rows at a time, as on level 0 (one at a time: ~3x slower)
                _score4(T, codes, scales, has_scale, fresh, u, nn, sc4)
                for w in range(min(4, nn - u)):
                    if sc4[w] > best_s:
                        best_s = sc4[w]
                        best = fresh[u + w]
            if best != cur:
                cur = best
                cur_s = best_s
                changed = True
    cv = np.empty(cap, np.float32)
    ci = np.empty(cap, np.int64)
    rv = np.full(ef, -np.inf, np.float32)
    ri = np.full(ef, -1, np.int64)
    csize = _max_heap_push(cv, ci, 0, cur_s, cur)
    visited[cur] = tag
    nres = 0  # allowed rows in rv, a min-heap over ef slots (-inf = empty)
    if allowed(allow, cur):
        heap_offer(rv, ri, cur_s, cur)
        nres = 1
    while csize > 0:
        c_s = cv[0]
        c = ci[0]
        if nres >= ef and c_s < rv[0]:
            break
        csize = _max_heap_pop(cv, ci, csize)
        if csize > 0:  # the likely next node's list loads while this one is scored
            nxt = offsets[ci[0]]
            for t in range(nxt + cum[0], nxt + cum[1], 64 // neighbors.itemsize):  # one per cache line
                prefetch1(neighbors, t)
        base = offsets[c]
        nn = 0  # unvisited neighbours (branch-free: about a third are), scored four at a time
        for t in range(base + cum[0], base + cum[1]):
            nb = neighbors[t]
            if nb < 0:
                break
            fresh[nn] = nb
            nn += visited[nb] != tag
            visited[nb] = tag
        for u in range(nn):  # the code rows load while the first ones are scored
            prefetch(codes, fresh[u], 0)
            prefetch(codes, fresh[u], last)
        for u in range(0, nn, 4):
            _score4(T, codes, scales, has_scale, fresh, u, nn, sc4)
            for w in range(min(4, nn - u)):
                s = sc4[w]
                nb = fresh[u + w]
                if nres < ef or s > rv[0]:
                    if csize < cap:
                        csize = _max_heap_push(cv, ci, csize, s, nb)
                    if allowed(allow, nb):
                        heap_offer(rv, ri, s, nb)
                        if nres < ef:
                            nres += 1
    heap_to_sorted(rv, ri)
    for t in range(min(out_v.shape[0], ef)):
        out_v[t] = rv[t]
        out_i[t] = ri[t]


@kernel
def graph_query_serial(Q, R, mean, slot_dim, centT, nav_codes, neighbors, offsets, cum, entry, max_level,
                       ef, cap, visited, tag0, allow, levels, fields, cl, tabs, codes, scales, kk, plan, ids, V, k):
    """The whole single-thread graph search of a few queries in one call
    (each step alone is a few microseconds, and so was the Python between
    them): rotate (``R`` (d, d); (0, 0): none), then a beam of width ``ef``
    (``_beam_one``; rows ``allow`` lets through, None: all) on the
    navigation codes (int16 tables), then

    - PLAN_FIELDS / PLAN_TABLES: full ADC of the beam, field by field or
      through lookup tables (``rerank.rescore_more``), top-kk, plus
      <q, mean> (float64): inner-product estimates;
    - PLAN_CAND (with ``V`` only): SIMD candidate ADC (``cl``), top-kk;
    - PLAN_NONE: the beam's rows as they are (for an exact re-rank);

    or, with ``nav_codes`` None, a beam walked on the full ADC (lookup
    tables from ``tabs``) whose best kk are kept as they are (``plan``
    unused; this build compiles no navigation tables); then, when ``V``
    (the stored copy: float32 rows or float16 bit patterns as uint16) has
    rows, the exact top-k of the kept rows (``rescore_rerank_one``).
    Returns (scores float32, rows int64, out_ids int64), each (nq, width)
    (width k if re-ranked, else kk after an ADC, else ef); out_ids =
    ids[rows], -1 (score -inf) for empty slots.  ``visited`` (1, n) uint8
    tag row, reused across calls: query qi marks rows with tag0 + qi + 1, so
    tags must grow from call to call (the caller zeroes the row before they
    wrap).  Raises ValueError when Q holds NaN or inf
    (``IndexBase._prepared_call`` leaves that check to this call)."""
    adc = plan == PLAN_FIELDS or plan == PLAN_TABLES
    if nav_codes is None:
        adc = True  # the walk's own scores are full-ADC scores
    out_v, out_r, out_ids, exact = search_outputs(Q, V, adc, k, kk, ef)
    nq, d = Q.shape
    Y = np.empty((1, d), np.float32)
    M = centT.shape[0]
    T = np.empty((M // 2, 256), np.int16)
    lut = np.empty((M, 16), np.float32)
    low = np.empty(M // 2, np.float32)
    full = plan == PLAN_TABLES
    if nav_codes is None:
        full = True
    Tf = np.empty((1 if full else 0, codes.shape[1], 256), np.float32)
    prev = np.empty(256, np.float32)
    beam_v = np.empty(ef, np.float32)
    beam_r = np.full((1, ef), -1, np.int64)
    no_scales = np.zeros(0, np.float32)
    hv = np.empty(kk, np.float32)  # ADC top-kk before an exact re-rank
    hr = np.empty(kk, np.int64)
    for qi in range(nq):
        rotate_query(Q, qi, R, Y)
        beam_v[:] = -np.inf
        beam_r[0] = -1
        if nav_codes is None:
            level_off, bits, field_ptr, field_dim = tabs
            _build_table(Y, 0, Tf[0], levels, level_off, bits, field_ptr, field_dim, codes.shape[1], prev)
            _beam_one(Tf[0], codes, scales, neighbors, offsets, cum, entry, max_level, ef, cap, visited[0],
                      tag0 + qi + 1, allow, beam_v, beam_r[0])
            if V is not None:  # None: no re-rank compiled
                if exact:
                    for t in range(kk):
                        hr[t] = beam_r[0, t]
                    rerank_rows(Q[qi], V, hr, out_v[qi], out_r[qi])
            if not exact:
                for t in range(kk):
                    out_v[qi, t] = beam_v[t]
                    out_r[qi, t] = beam_r[0, t]
                add_mean_one(Q, qi, mean, out_v[qi], out_r[qi])
        else:
            nav_table_one(Y, 0, slot_dim, centT, lut, low, T)
            _beam_one(T, nav_codes, no_scales, neighbors, offsets, cum, entry, max_level, ef, cap, visited[0],
                      tag0 + qi + 1, allow, beam_v, beam_r[0])
            if not rescore_rerank_one(Y, Q, qi, mean, levels, fields, cl, tabs, Tf, codes, scales, beam_r, plan, V,
                                      hv, hr, out_v[qi], out_r[qi]):
                for t in range(ef):
                    out_v[qi, t] = beam_v[t]
                    out_r[qi, t] = beam_r[0, t]
        ids_of_rows_one(out_v[qi], out_r[qi], out_ids[qi], ids)
    return out_v, out_r, out_ids
